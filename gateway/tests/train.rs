//! The built-in tokenizer trainer: layout of the special tokens, lossless encoding of any text,
//! the files it writes (compared with the fixtures' files), and determinism.
#![allow(clippy::unwrap_used)]

use myriad_gateway::{
    CHAT_TEMPLATE, ChatTemplate, Tokenizer, TokenizerFiles, TokenizerSpec, TrainError,
    train_tokenizer,
};
use myriad_model::Family;
use myriad_model::presets::special_tokens;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures")
        .join(name)
}

fn read_json(path: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A fresh directory under the system temp dir, unique to this process and `name`.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("myriad-gateway-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn timed(spec: &TokenizerSpec) -> TokenizerFiles {
    let start = Instant::now();
    let files = train_tokenizer(spec).unwrap();
    eprintln!(
        "trained vocab {} ({}): {} regular tokens in {:.2?}",
        spec.vocab_size,
        spec.tokenizer_class,
        files.regular_tokens,
        start.elapsed()
    );
    files
}

fn next_1024() -> &'static TokenizerFiles {
    static FILES: OnceLock<TokenizerFiles> = OnceLock::new();
    FILES.get_or_init(|| {
        timed(&TokenizerSpec::qwen3_next(
            1024,
            special_tokens(Family::Qwen3Next),
        ))
    })
}

fn moe_2048() -> &'static TokenizerFiles {
    static FILES: OnceLock<TokenizerFiles> = OnceLock::new();
    FILES.get_or_init(|| {
        timed(&TokenizerSpec::qwen3_5_moe(
            2048,
            special_tokens(Family::Qwen35Moe),
        ))
    })
}

fn load(files: &TokenizerFiles) -> Tokenizer {
    Tokenizer::from_json(&files.tokenizer_json, Some(&files.tokenizer_config_json)).unwrap()
}

fn check_specials(files: &TokenizerFiles, vocab_size: usize, specials: &[&str]) {
    let tok = load(files);
    let first = vocab_size - specials.len();
    assert_eq!(
        files.regular_tokens, first,
        "the corpus should reach the target vocabulary"
    );
    assert_eq!(tok.vocab_size(), vocab_size);
    for (i, special) in specials.iter().enumerate() {
        let id = (first + i) as u32;
        assert_eq!(tok.token_to_id(special), Some(id), "{special}");
        assert_eq!(
            tok.encode(special).unwrap(),
            vec![id],
            "{special} encodes to its id"
        );
        assert_eq!(tok.is_special(id), special.starts_with("<|"), "{special}");
    }
    let doc: Value = serde_json::from_str(&files.tokenizer_json).unwrap();
    for entry in doc["added_tokens"].as_array().unwrap() {
        let content = entry["content"].as_str().unwrap();
        assert_eq!(
            entry["special"],
            json!(content.starts_with("<|")),
            "{content}"
        );
        assert_eq!(entry["normalized"], json!(false), "{content}");
    }
    assert_eq!(tok.eos_token_id(), tok.token_to_id("<|im_end|>"));
    assert_eq!(tok.pad_token_id(), tok.token_to_id("<|endoftext|>"));
    assert_eq!(tok.bos_token_id(), None);
    // Every regular id is a learned token: below the specials nothing is left unused.
    assert!((0..first as u32).all(|id| {
        tok.id_to_token(id)
            .is_some_and(|t| !t.starts_with("<|unused"))
    }));
}

#[test]
fn specials_sit_at_the_top_with_qwen_flags() {
    check_specials(next_1024(), 1024, special_tokens(Family::Qwen3Next));
    check_specials(moe_2048(), 2048, special_tokens(Family::Qwen35Moe));
}

/// NFC-stable characters from many scripts plus every control character.
fn random_text(seed: u64, chars: usize) -> String {
    const RANGES: [(u32, u32); 9] = [
        (0x20, 0x7e),
        (0x00, 0x1f),
        (0x7f, 0x7f),
        (0xe0, 0xff),
        (0x391, 0x3a9),
        (0x430, 0x44f),
        (0x4e00, 0x9fff),
        (0xac00, 0xd7a3),
        (0x1f300, 0x1f64f),
    ];
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..chars)
        .map(|_| {
            let (lo, hi) = RANGES[(next() % RANGES.len() as u64) as usize];
            char::from_u32(lo + (next() % u64::from(hi - lo + 1)) as u32).unwrap()
        })
        .collect()
}

#[test]
fn any_text_round_trips() {
    let mut texts: Vec<String> = [
        "Hello, world!",
        "",
        " ",
        "\r\n\r\n  indented\r\n\tand tabbed\t\n",
        "naïve café — 日本語のテキスト 🙂👍🏽 👨‍👩‍👧 ﷺ",
        "control: \u{0}\u{1}\u{7}\u{8}\u{b}\u{c}\u{1b}\u{7f}\u{85}\u{2028} end",
        "Numbers: 12345 3.14159 -42 1e-6 0x1F",
        "it's we're they'll I'd you've HE'S",
        "<|im_start|>user\nhi<|im_end|>\n<think>\nhmm\n</think>\n\n<tool_call>\n{}\n</tool_call>",
        "<|im_start <|im_end| <think <|unused_0|>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    texts.extend((0..20).map(|seed| random_text(seed + 1, 300)));
    for files in [next_1024(), moe_2048()] {
        let tok = load(files);
        for text in &texts {
            let ids = tok.encode(text).unwrap();
            assert_eq!(
                &tok.decode(&ids, false).unwrap(),
                text,
                "round trip of {text:?}"
            );
            let mut stream = tok.decode_stream(false);
            let mut streamed = String::new();
            for &id in &ids {
                streamed.push_str(&stream.step(id).unwrap().unwrap_or_default());
            }
            streamed.push_str(&stream.finish().unwrap());
            assert_eq!(&streamed, text, "streamed {text:?}");
        }
        // The normaliser is NFC, so decomposed input comes back composed.
        let ids = tok.encode("e\u{301} vs \u{e9}").unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), "\u{e9} vs \u{e9}");
        // Special tokens are recognised inside text, and only the `<|...|>` ones are skipped.
        let ids = tok
            .encode("<|im_start|>user\nhi<|im_end|><think>x</think>")
            .unwrap();
        assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
        assert!(ids.contains(&tok.token_to_id("<|im_end|>").unwrap()));
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi<think>x</think>");
    }
}

#[test]
fn files_match_the_fixture_layout() {
    // Same vocab size and specials as the fixture: the config must be the fixture's, byte for byte.
    let mut spec = TokenizerSpec::qwen3_5_moe(1024, special_tokens(Family::Qwen35Moe));
    spec.model_max_length = 4096;
    let files = timed(&spec);
    let fixture = fixture_dir("qwen3_5_moe-tiny");
    assert_eq!(
        files.tokenizer_config_json,
        std::fs::read_to_string(fixture.join("tokenizer_config.json")).unwrap()
    );
    let ours: Value = serde_json::from_str(&files.tokenizer_json).unwrap();
    let theirs = read_json(fixture.join("tokenizer.json"));
    for key in [
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
        "added_tokens",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    for key in [
        "type",
        "dropout",
        "unk_token",
        "fuse_unk",
        "byte_fallback",
        "ignore_merges",
    ] {
        assert_eq!(ours["model"][key], theirs["model"][key], "model.{key}");
    }
    let next = read_json(fixture_dir("qwen3_next-tiny").join("tokenizer.json"));
    let ours: Value = serde_json::from_str(&next_1024().tokenizer_json).unwrap();
    assert_eq!(ours["pre_tokenizer"], next["pre_tokenizer"]);
    assert_eq!(ours["added_tokens"], next["added_tokens"]);
}

#[test]
fn template_renders_the_fixture_chats() {
    let fixture_template = read_json(fixture_dir("qwen3_next-tiny").join("tokenizer_config.json"))
        ["chat_template"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(CHAT_TEMPLATE.trim_end_matches('\n'), fixture_template);

    let dir = temp_dir("template");
    moe_2048().write_to(&dir).unwrap();
    let template = ChatTemplate::from_dir(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let cases = read_json(fixture_dir("qwen3_5_moe-tiny").join("tokenizer_cases.json"));
    let mut with_tools = 0;
    let mut without_thinking = 0;
    for case in cases["chat"].as_array().unwrap() {
        let mut kwargs = case["kwargs"].as_object().unwrap().clone();
        let add_generation_prompt = kwargs
            .remove("add_generation_prompt")
            .unwrap()
            .as_bool()
            .unwrap();
        let tools = case.get("tools");
        with_tools += usize::from(tools.is_some());
        without_thinking += usize::from(kwargs.get("enable_thinking") == Some(&json!(false)));
        let rendered = template
            .render(&case["messages"], tools, add_generation_prompt, &kwargs)
            .unwrap();
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "{}",
            case["name"]
        );
        let ids = tok.encode(&rendered).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), rendered);
        assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
    }
    assert!(with_tools > 0 && without_thinking > 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn written_files_load_back() {
    let dir = temp_dir("load");
    next_1024().write_to(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.vocab_size(), 1024);
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    let template = ChatTemplate::from_dir(&dir).unwrap();
    let prompt = template
        .render(
            &json!([{"role": "user", "content": "Say hi."}]),
            None,
            true,
            &json!({"enable_thinking": false})
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn training_is_deterministic() {
    let again = train_tokenizer(&TokenizerSpec::qwen3_next(
        1024,
        special_tokens(Family::Qwen3Next),
    ))
    .unwrap();
    assert_eq!(&again, next_1024());
}

#[test]
fn bad_specs_are_rejected() {
    let mut spec = TokenizerSpec::qwen3_next(200, special_tokens(Family::Qwen3Next));
    assert!(matches!(
        train_tokenizer(&spec),
        Err(TrainError::VocabTooSmall { .. })
    ));
    spec.vocab_size = 1024;
    spec.specials.retain(|s| s != "<|im_end|>");
    let err = train_tokenizer(&spec).unwrap_err();
    assert!(err.to_string().contains("<|im_end|>"), "{err}");
    spec.specials.push("<think>".into());
    assert!(matches!(
        train_tokenizer(&spec),
        Err(TrainError::DuplicateSpecial(_))
    ));
}

/// The `bench` preset's vocabulary: about 3 s in a debug build on two cores, so it runs by
/// default.
#[test]
fn trains_the_bench_vocabulary() {
    let files = timed(&TokenizerSpec::qwen3_next(
        32768,
        special_tokens(Family::Qwen3Next),
    ));
    check_specials(&files, 32768, special_tokens(Family::Qwen3Next));
    let tok = load(&files);
    let text = "What is the capital of France? Please answer in one word.";
    assert!(
        tok.encode(text).unwrap().len() <= 16,
        "common English should tokenise into words"
    );
}
