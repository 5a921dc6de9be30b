//! `myriad launch --http`: every role its own process (2 expert nodes, 1 prefill node, 1
//! decode node, the gateway), `--disagg-min-prompt-tokens 1` so every prompt is prefilled on
//! the prefill node and its state moved to the decode node over QUIC. Over a real socket,
//! `/v1/completions` with a token-id prompt, `echo` and `logprobs` gives every fixture's
//! reference greedy tokens and the transformers log-probabilities of every prompt position
//! (the public fixtures, the repository's YaRN ones and any in `MYRIAD_EXTRA_FIXTURES`), and
//! the gateway counts the requests as disaggregated. A prompt of 32,768 tokens goes the same
//! way on a tiny model made with a long context.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

mod common;
#[path = "common/nodes.rs"]
mod nodes;

use nodes::{Proc, http, metrics, sample};

/// The fixtures the golden tests use: the public ones, the repository's, and any directories
/// in `MYRIAD_EXTRA_FIXTURES` (colon-separated).
fn fixture_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs: Vec<PathBuf> = ["qwen3_next-tiny", "qwen3_5_moe-tiny", "qwen3_next-mini512"]
        .iter()
        .map(|n| root.join("../../shared/fixtures").join(n))
        .collect();
    dirs.extend(
        ["qwen3_next-tiny-yarn", "qwen3_5_moe-tiny-yarn"]
            .iter()
            .map(|n| root.join("../tests/fixtures").join(n)),
    );
    if let Some(extra) = std::env::var_os("MYRIAD_EXTRA_FIXTURES") {
        dirs.extend(std::env::split_paths(&extra));
    }
    dirs
}

/// `myriad launch --http 127.0.0.1:0` with one prefill node; returns it and the gateway URL.
fn launch(model: &Path, expert_nodes: usize, extra: &[&str]) -> (Proc, String) {
    launch_with(model, expert_nodes, 1, extra)
}

fn launch_with(
    model: &Path,
    expert_nodes: usize,
    prefill_nodes: usize,
    extra: &[&str],
) -> (Proc, String) {
    let model = model.display().to_string();
    let experts = expert_nodes.to_string();
    let prefill = prefill_nodes.to_string();
    let mut args = vec![
        "launch",
        "--model",
        &model,
        "--expert-nodes",
        &experts,
        "--prefill-nodes",
        &prefill,
        "--decode-nodes",
        "1",
        "--http",
        "127.0.0.1:0",
        "--insecure-dev-certs",
        "--disagg-min-prompt-tokens",
        "1",
        "--node-threads",
        "1",
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::start(&args);
    let url = p.ready();
    (p, url)
}

fn tensor_f32(st: &SafeTensors<'_>, name: &str) -> Option<Vec<f32>> {
    let t = st.tensor(name).ok()?;
    Some(match t.dtype() {
        Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => t
            .data()
            .chunks_exact(2)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    })
}

fn tensor_ids(st: &SafeTensors<'_>, name: &str) -> Option<Vec<u32>> {
    let t = st.tensor(name).ok()?;
    Some(
        t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect(),
    )
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
    let sum: f64 = row.iter().map(|v| (*v as f64 - max).exp()).sum();
    row.iter().map(|v| *v as f64 - max - sum.ln()).collect()
}

fn token_ids(lp: &Value) -> Vec<u32> {
    lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t.as_str()
                .and_then(|t| t.strip_prefix("token_id:"))
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("token {t} is not token_id:N"))
        })
        .collect()
}

#[test]
fn a_launched_disaggregated_cluster_returns_the_reference() {
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let vocab = config["vocab_size"]
            .as_u64()
            .or_else(|| config["text_config"]["vocab_size"].as_u64())
            .unwrap() as usize;
        let (_cluster, url) = launch(&dir, 2, &[]);
        let mut sent = 0;
        for i in 0.. {
            let Some(ids) = tensor_ids(&st, &format!("prompt.{i}.input_ids")) else {
                break;
            };
            let greedy = tensor_ids(&st, &format!("prompt.{i}.greedy_ids")).unwrap();
            let body = json!({"model": name, "prompt": ids, "max_tokens": greedy.len(),
                "temperature": 0, "echo": true, "logprobs": 1, "ignore_eos": true,
                "return_tokens_as_token_ids": true});
            let r = http(&url, "POST", "/v1/completions", Some(&body));
            assert_eq!(r.status, 200, "{name} prompt {i}: {}", r.json());
            assert_eq!(r.header("x-myriad-path"), Some("disaggregated"), "{name}");
            sent += 1;
            let lp = &r.json()["choices"][0]["logprobs"];
            let tokens = token_ids(lp);
            assert_eq!(&tokens[..ids.len()], &ids[..], "{name} prompt {i}: echo");
            assert_eq!(
                &tokens[ids.len()..],
                &greedy[..],
                "{name} prompt {i}: greedy"
            );
            let got = lp["token_logprobs"].as_array().unwrap();
            assert!(got[0].is_null(), "the first prompt position has no logprob");
            if let Some(logits) = tensor_f32(&st, &format!("prompt.{i}.logits")) {
                for pos in 1..ids.len() {
                    let want =
                        log_softmax(&logits[(pos - 1) * vocab..pos * vocab])[ids[pos] as usize];
                    let have = got[pos].as_f64().unwrap();
                    assert!(
                        (want - have).abs() < 1e-3,
                        "{name} prompt {i} position {pos}: {have} vs reference {want}"
                    );
                }
            }
        }
        assert!(sent > 0, "{name}: no prompts");
        let m = metrics(&url);
        assert_eq!(
            sample(&m, "myriad_gateway_disaggregated_requests_total"),
            sent as f64,
            "{name}"
        );
        assert_eq!(sample(&m, "myriad_gateway_direct_requests_total"), 0.0);
    }
}

#[test]
fn a_32k_token_prompt_goes_through_the_prefill_node() {
    let dir = tempdir("long-context");
    let out = dir.join("model");
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_myriad"))
        .args([
            "make-model",
            "--preset",
            "tiny",
            "--max-positions",
            "40000",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    // Every expert in the attention nodes: the prompt's cost is attention and the transfer.
    let (_cluster, url) = launch(&out, 0, &["--kv-cache-gb", "1"]);
    let n = 32_768;
    let prompt: Vec<u32> = (0..n).map(|i| (i * 7919 % 900) as u32 + 10).collect();
    let body = json!({"model": "model", "prompt": prompt, "max_tokens": 3, "temperature": 0,
        "ignore_eos": true});
    let r = nodes::http_with_timeout(&url, "/v1/completions", &body, Duration::from_secs(600));
    assert_eq!(r.status, 200, "{}", r.json());
    assert_eq!(r.header("x-myriad-path"), Some("disaggregated"));
    let usage = &r.json()["usage"];
    assert_eq!(usage["prompt_tokens"], n);
    assert_eq!(usage["completion_tokens"], 3);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without prefill nodes the nodes behind the gateway are mixed and serve every request
/// directly.
#[test]
fn without_prefill_nodes_every_request_is_direct() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/qwen3_5_moe-tiny");
    let (_cluster, url) = launch_with(&dir, 0, 0, &[]);
    let body = json!({"model": "qwen3_5_moe-tiny", "prompt": [1, 2, 3, 4], "max_tokens": 2});
    let r = http(&url, "POST", "/v1/completions", Some(&body));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-myriad-path"), Some("direct"));
    assert_eq!(http(&url, "GET", "/health", None).status, 200);
    assert_eq!(
        sample(&metrics(&url), "myriad_gateway_direct_requests_total"),
        1.0
    );
}

fn tempdir(what: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("myriad-test-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
