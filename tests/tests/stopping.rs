//! Stop rules end to end: the eos ids of `generation_config.json` end a sequence (kept in the
//! output, finish reason "stop") unless the request ignores them; stop token ids do the same.

#![allow(clippy::unwrap_used)]

use myriad_attention::{FinishReason, Request};
use myriad_tests::{Reference, engine, fixture};

/// A copy of `qwen3_next-tiny` whose generation config says `eos` ends sequences.
fn fixture_with_eos(eos: u32) -> std::path::PathBuf {
    let src = fixture("qwen3_next-tiny");
    let dst = std::env::temp_dir().join(format!("myriad-stop-{}-{eos}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
    }
    let path = dst.join("generation_config.json");
    let mut g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    g["eos_token_id"] = serde_json::json!([eos]);
    std::fs::write(&path, g.to_string()).unwrap();
    dst
}

#[test]
fn eos_from_generation_config_and_stop_ids_end_sequences() {
    let r = Reference::load(&fixture("qwen3_next-tiny"));
    let prompt = r.ids("prompt.3.input_ids").unwrap();
    let greedy = r.ids("prompt.3.greedy_ids").unwrap();
    // The 4th greedy token becomes the end-of-sequence token.
    let eos = greedy[3];
    let first = greedy.iter().position(|&t| t == eos).unwrap();
    let dir = fixture_with_eos(eos);
    let e = engine(&dir);
    let out = e
        .engine
        .generate(&[Request::greedy(prompt.clone(), 16)])
        .unwrap()
        .remove(0);
    assert_eq!(out.token_ids, greedy[..=first].to_vec());
    assert_eq!(out.finish_reason, FinishReason::Stop);

    let ignoring = Request {
        ignore_eos: true,
        ..Request::greedy(prompt.clone(), 16)
    };
    let out = e.engine.generate(&[ignoring]).unwrap().remove(0);
    assert_eq!(out.token_ids, greedy);
    assert_eq!(out.finish_reason, FinishReason::Length);

    // Stop token ids end a sequence even when eos is ignored.
    let stop = greedy[6];
    let at = greedy.iter().position(|&t| t == stop).unwrap();
    let stopping = Request {
        ignore_eos: true,
        stop_token_ids: vec![stop],
        ..Request::greedy(prompt, 16)
    };
    let out = e.engine.generate(&[stopping]).unwrap().remove(0);
    assert_eq!(out.token_ids, greedy[..=at].to_vec());
    assert_eq!(out.finish_reason, FinishReason::Stop);
    let _ = std::fs::remove_dir_all(&dir);
}
