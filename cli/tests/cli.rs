//! The `myriad` binary end to end: the `generate` JSON contract against the reference, bad
//! inputs that must fail with a message naming the cause, and `make-model` → `generate`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;
use serde_json::Value;

fn myriad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_myriad"))
        .args(args)
        .env("MYRIAD_THREADS", "2")
        .output()
        .unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("myriad-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fails_with(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "should have failed");
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}:\n{err}");
    }
}

fn reference(dir: &Path) -> (Vec<u8>, Value) {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let json = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    (bytes, json)
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn generate_json_matches_the_reference_tokens_and_logprobs() {
    let dir = fixture("qwen3_next-tiny");
    let (bytes, json) = reference(&dir);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let p = &json["prompts"][3];
    let ids: Vec<u64> = p["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let greedy: Vec<u64> = p["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let out = myriad(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-token-ids",
        &list,
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--ignore-eos",
        "--echo",
        "--logprobs",
        "3",
        "--output",
        "json",
    ]);
    let v = ok_json(&out);
    let got: Vec<u64> = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(got, greedy);
    assert_eq!(v["prompt_token_ids"].as_array().unwrap().len(), ids.len());
    let lps = v["logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), ids.len() + greedy.len());
    assert!(lps[0].is_null());
    // Prompt positions: log-softmax of the reference prefill logits.
    let logits = f32s(&st, "prompt.3.logits");
    let vocab = logits.len() / ids.len();
    for i in 1..ids.len() {
        let row = &logits[(i - 1) * vocab..i * vocab];
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = row.iter().map(|x| f64::from(x - m).exp()).sum();
        let want = row[ids[i] as usize] - m - z.ln() as f32;
        let e = &lps[i];
        assert_eq!(e["token_id"].as_u64().unwrap(), ids[i]);
        assert!(
            (e["logprob"].as_f64().unwrap() as f32 - want).abs() < 1e-3,
            "position {i}"
        );
        assert_eq!(e["top"].as_array().unwrap().len(), 3);
    }
    assert_eq!(v["finish_reason"], "length");
}

#[test]
fn bad_inputs_fail_with_a_message_naming_the_cause() {
    let dir = fixture("qwen3_5_moe-tiny");
    let d = dir.to_str().unwrap();
    let missing = scratch("missing");
    fails_with(
        &myriad(&[
            "generate",
            "--model",
            missing.join("nope").to_str().unwrap(),
            "--prompt-token-ids",
            "1",
            "--output",
            "json",
        ]),
        &["config.json"],
    );
    fails_with(
        &myriad(&[
            "generate",
            "--model",
            d,
            "--prompt-token-ids",
            "1,99999",
            "--output",
            "json",
        ]),
        &["99999", "vocabulary"],
    );
    fails_with(
        &myriad(&["generate", "--model", d, "--prompt-token-ids", "1,x"]),
        &["invalid value"],
    );
    fails_with(
        &myriad(&[
            "generate",
            "--model",
            d,
            "--prompt-token-ids",
            "1",
            "--top-p",
            "1.5",
            "--output",
            "json",
        ]),
        &["top_p"],
    );

    // A broken config and a truncated checkpoint, in copies of the fixture.
    let broken = scratch("broken");
    for f in std::fs::read_dir(&dir).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, broken.join(f.file_name().unwrap())).unwrap();
    }
    let cfg = std::fs::read_to_string(broken.join("config.json")).unwrap();
    std::fs::write(
        broken.join("config.json"),
        cfg.replace("\"hidden_size\": 64", "\"hidden_size\": \"wide\""),
    )
    .unwrap();
    let b = broken.to_str().unwrap();
    fails_with(
        &myriad(&[
            "generate",
            "--model",
            b,
            "--prompt-token-ids",
            "1",
            "--output",
            "json",
        ]),
        &["config.json", "hidden_size"],
    );
    std::fs::write(broken.join("config.json"), cfg).unwrap();
    let st = broken.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&st)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    fails_with(
        &myriad(&[
            "generate",
            "--model",
            b,
            "--prompt-token-ids",
            "1",
            "--output",
            "json",
        ]),
        &["model.safetensors"],
    );
    let _ = std::fs::remove_dir_all(&broken);
    let _ = std::fs::remove_dir_all(&missing);
}

#[test]
fn make_model_then_generate_text_and_chat() {
    let out_dir = scratch("made");
    let m = out_dir.join("m");
    let made = myriad(&[
        "make-model",
        "--preset",
        "tiny",
        "--family",
        "qwen3_next",
        "--out",
        m.to_str().unwrap(),
    ]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let md = m.to_str().unwrap();
    let v = ok_json(&myriad(&[
        "generate",
        "--model",
        md,
        "--prompt",
        "Hello, world!",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--ignore-eos",
        "--output",
        "json",
    ]));
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 5);
    assert!(v["text"].is_string());
    let chat = myriad(&[
        "generate",
        "--model",
        md,
        "--chat",
        "Say hi",
        "--no-thinking",
        "--max-tokens",
        "4",
        "--seed",
        "3",
    ]);
    assert!(
        chat.status.success(),
        "{}",
        String::from_utf8_lossy(&chat.stderr)
    );
    // Seeded sampling through the CLI is reproducible.
    let again = myriad(&[
        "generate",
        "--model",
        md,
        "--chat",
        "Say hi",
        "--no-thinking",
        "--max-tokens",
        "4",
        "--seed",
        "3",
    ]);
    assert_eq!(chat.stdout, again.stdout);
    let _ = std::fs::remove_dir_all(&out_dir);
}
