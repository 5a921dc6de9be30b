//! The tokenizer and chat template against the oracle fixtures: every `encode` and `chat` case
//! of every fixture's `tokenizer_cases.json` (produced by `tokenizers` and transformers).
#![allow(clippy::unwrap_used)]

use myriad_gateway::{ChatTemplate, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;

const FIXTURES: [&str; 4] = [
    "qwen3_next-tiny",
    "qwen3_next-mini512",
    "qwen3_5_moe-tiny",
    "qwen3_5_moe-mini512",
];

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures")
        .join(name)
}

/// The public fixtures plus any in `MYRIAD_EXTRA_FIXTURES` (colon-separated directories made by
/// `make_fixtures.py` with other seeds, prompts and shapes), as (name, directory).
fn fixture_dirs() -> Vec<(String, PathBuf)> {
    let mut dirs: Vec<(String, PathBuf)> = FIXTURES
        .iter()
        .map(|n| (n.to_string(), fixture_dir(n)))
        .collect();
    if let Some(extra) = std::env::var_os("MYRIAD_EXTRA_FIXTURES") {
        dirs.extend(std::env::split_paths(&extra).map(|d| (d.display().to_string(), d)));
    }
    dirs
}

fn read_json(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

#[test]
fn encode_cases_match() {
    let mut checked = 0;
    for (name, dir) in fixture_dirs() {
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let cases = read_json(dir.join("tokenizer_cases.json"));
        assert_eq!(
            cases["problems"].as_array().unwrap().len(),
            0,
            "{name}: fixture problems"
        );
        for case in cases["encode"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want = ids(&case["ids"]);
            let got = tok.encode(text).unwrap();
            assert_eq!(got, want, "{name}: encode {text:?}");
            assert_eq!(
                tok.decode(&got, false).unwrap(),
                case["decoded"].as_str().unwrap(),
                "{name}: decode {text:?}"
            );
            assert_eq!(
                tok.decode(&got, true).unwrap(),
                case["decoded_skip_special"].as_str().unwrap(),
                "{name}: decode skipping specials {text:?}"
            );
            for skip in [false, true] {
                let mut stream = tok.decode_stream(skip);
                let mut streamed = String::new();
                for &id in &got {
                    if let Some(piece) = stream.step(id).unwrap() {
                        assert!(
                            !piece.contains('\u{FFFD}'),
                            "{name}: partial character in {piece:?}"
                        );
                        streamed.push_str(&piece);
                    }
                }
                streamed.push_str(&stream.finish().unwrap());
                assert_eq!(
                    streamed,
                    tok.decode(&got, skip).unwrap(),
                    "{name}: streamed {text:?}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 44, "only {checked} encode cases checked");
}

#[test]
fn chat_cases_match() {
    let mut checked = 0;
    for (name, dir) in fixture_dirs() {
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let template = ChatTemplate::from_dir(&dir).unwrap();
        let cases = read_json(dir.join("tokenizer_cases.json"));
        for case in cases["chat"].as_array().unwrap() {
            let case_name = case["name"].as_str().unwrap();
            let mut kwargs = case["kwargs"].as_object().unwrap().clone();
            let add_generation_prompt = kwargs
                .remove("add_generation_prompt")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            let tools = case.get("tools").filter(|t| !t.is_null());
            let rendered = template
                .render(&case["messages"], tools, add_generation_prompt, &kwargs)
                .unwrap();
            assert_eq!(
                rendered,
                case["rendered"].as_str().unwrap(),
                "{name}/{case_name}: rendered"
            );
            assert_eq!(
                tok.encode(&rendered).unwrap(),
                ids(&case["ids"]),
                "{name}/{case_name}: ids"
            );
            assert_eq!(
                tok.decode(&ids(&case["ids"]), false).unwrap(),
                rendered,
                "{name}/{case_name}: decode"
            );
            checked += 1;
        }
    }
    assert!(checked >= 24, "only {checked} chat cases checked");
}

#[test]
fn special_tokens_match_reference() {
    for (name, dir) in fixture_dirs() {
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let reference = read_json(dir.join("reference.json"));
        let config = read_json(dir.join("config.json"));
        let vocab = config
            .get("text_config")
            .and_then(|t| t.get("vocab_size"))
            .or_else(|| config.get("vocab_size"))
            .and_then(Value::as_u64)
            .unwrap();
        assert_eq!(tok.vocab_size() as u64, vocab, "{name}");
        for (token, id) in reference["special_token_ids"].as_object().unwrap() {
            let id = u32::try_from(id.as_u64().unwrap()).unwrap();
            assert_eq!(tok.token_to_id(token), Some(id), "{name}: {token}");
            assert_eq!(
                tok.id_to_token(id).as_deref(),
                Some(token.as_str()),
                "{name}: {token}"
            );
            assert_eq!(
                tok.is_special(id),
                token.starts_with("<|"),
                "{name}: {token}"
            );
        }
        assert_eq!(tok.eos_token_id(), tok.token_to_id("<|im_end|>"), "{name}");
        assert_eq!(
            tok.pad_token_id(),
            tok.token_to_id("<|endoftext|>"),
            "{name}"
        );
        assert_eq!(tok.bos_token_id(), None, "{name}");
    }
}

#[test]
fn unknown_ids_and_missing_files_are_errors() {
    let dir = fixture_dir("qwen3_next-tiny");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let err = tok.decode(&[5, 1024], false).unwrap_err().to_string();
    assert!(err.contains("1024"), "{err}");
    assert!(tok.decode_stream(false).step(99_999).is_err());
    let missing = dir.join("no-such-model");
    let err = Tokenizer::from_dir(&missing).unwrap_err().to_string();
    assert!(
        err.contains("no-such-model") && err.contains("tokenizer.json"),
        "{err}"
    );
    let err = ChatTemplate::from_dir(&missing).unwrap_err().to_string();
    assert!(err.contains("no-such-model"), "{err}");

    let broken = std::env::temp_dir().join(format!("myriad-gateway-{}-broken", std::process::id()));
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("tokenizer.json"), "{\"model\": ").unwrap();
    let err = Tokenizer::from_dir(&broken).unwrap_err().to_string();
    assert!(
        err.contains("malformed tokenizer file") && err.contains("broken/tokenizer.json"),
        "{err}"
    );
    std::fs::copy(dir.join("tokenizer.json"), broken.join("tokenizer.json")).unwrap();
    std::fs::write(
        broken.join("tokenizer_config.json"),
        "{\"eos_token\": \"<nope>\"}",
    )
    .unwrap();
    let err = Tokenizer::from_dir(&broken).unwrap_err().to_string();
    assert!(err.contains("eos_token") && err.contains("<nope>"), "{err}");
    let err = ChatTemplate::from_dir(&broken).unwrap_err().to_string();
    assert!(err.contains("no chat template"), "{err}");
    std::fs::write(broken.join("tokenizer_config.json"), "[1,").unwrap();
    let err = Tokenizer::from_dir(&broken).unwrap_err().to_string();
    assert!(
        err.contains("malformed JSON") && err.contains("broken/tokenizer_config.json"),
        "{err}"
    );
    std::fs::write(broken.join("chat_template.jinja"), "{% for %}").unwrap();
    let err = ChatTemplate::from_dir(&broken).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json"),
        "the config is read first: {err}"
    );
    std::fs::remove_file(broken.join("tokenizer_config.json")).unwrap();
    let err = ChatTemplate::from_dir(&broken).unwrap_err().to_string();
    assert!(err.contains("syntax error"), "{err}");
    std::fs::remove_dir_all(&broken).unwrap();
}

#[test]
fn types_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<ChatTemplate>();
}

#[test]
fn streaming_never_splits_a_character() {
    let tok = Tokenizer::from_dir(&fixture_dir("qwen3_5_moe-tiny")).unwrap();
    let text = "日本語のテキスト 🙂👍🏽 naïve";
    let ids = tok.encode(text).unwrap();
    let mut stream = tok.decode_stream(false);
    let mut out = String::new();
    let mut held_back = 0;
    for &id in &ids {
        match stream.step(id).unwrap() {
            Some(piece) => out.push_str(&piece),
            None => held_back += 1,
        }
    }
    assert!(
        held_back > 0,
        "the tiny vocabulary should split some characters across tokens"
    );
    assert_eq!(stream.finish().unwrap(), "");
    assert_eq!(out, text);

    // A stream cut inside a character hands the dangling bytes out as U+FFFD at the end.
    let cut = tok.encode("🙂").unwrap();
    assert!(cut.len() > 1);
    let mut stream = tok.decode_stream(false);
    assert_eq!(stream.step(cut[0]).unwrap(), None);
    assert!(stream.finish().unwrap().ends_with('\u{FFFD}'));
}
