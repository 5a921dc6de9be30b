//! The HTTP API returns the reference numbers: `POST /v1/completions` with a token-id prompt,
//! `echo` and `logprobs` gives, over a real socket, the transformers log-probabilities of every
//! prompt position and the reference greedy tokens, for every fixture.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use myriad_attention::{Generate, Scheduler, SchedulerConfig};
use myriad_gateway::{GatewayConfig, GatewayState};
use myriad_tests::{Reference, engine, fixture_dirs};
use serde_json::{Value, json};

/// `POST path` with a JSON body over a plain HTTP/1.1 connection; (status, body).
fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
    let sum: f64 = row.iter().map(|v| (*v as f64 - max).exp()).sum();
    row.iter().map(|v| *v as f64 - max - sum.ln()).collect()
}

#[test]
fn completions_return_the_reference_logprobs_over_http() {
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let reference = Reference::load(&dir);
        let local = engine(&dir);
        let vocab = local.config.vocab_size;
        let scheduler: Arc<dyn Generate> = Arc::new(Scheduler::start(
            local.engine.clone(),
            SchedulerConfig::default(),
        ));
        let state = Arc::new(
            GatewayState::from_model_dir(GatewayConfig::new("m"), &dir, scheduler).unwrap(),
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(myriad_gateway::serve(
            listener,
            myriad_gateway::router(state),
            async {
                let _ = stopped.await;
            },
        ));
        let mut compared = 0;
        for i in 0..reference.num_prompts() {
            let ids = reference.ids(&format!("prompt.{i}.input_ids")).unwrap();
            let greedy = reference.ids(&format!("prompt.{i}.greedy_ids")).unwrap();
            let (status, r) = post(
                &addr,
                "/v1/completions",
                &json!({"model": "m", "prompt": ids, "max_tokens": greedy.len(),
                    "temperature": 0, "echo": true, "logprobs": 1, "ignore_eos": true,
                    "return_tokens_as_token_ids": true}),
            );
            assert_eq!(status, 200, "{name} prompt {i}: {r}");
            let lp = &r["choices"][0]["logprobs"];
            let tokens: Vec<u32> = lp["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    t.as_str()
                        .and_then(|t| t.strip_prefix("token_id:"))
                        .and_then(|t| t.parse().ok())
                        .unwrap_or_else(|| panic!("{name}: token {t} is not token_id:N"))
                })
                .collect();
            assert_eq!(&tokens[..ids.len()], &ids[..], "{name} prompt {i}: echo");
            assert_eq!(
                &tokens[ids.len()..],
                &greedy[..],
                "{name} prompt {i}: greedy tokens"
            );
            let got = lp["token_logprobs"].as_array().unwrap();
            assert!(got[0].is_null(), "the first prompt position has no logprob");
            if let Some(logits) = reference.f32(&format!("prompt.{i}.logits")) {
                for pos in 1..ids.len() {
                    let want = log_softmax(&logits.data[(pos - 1) * vocab..pos * vocab])
                        [ids[pos] as usize];
                    let have = got[pos].as_f64().unwrap();
                    assert!(
                        (want - have).abs() < 1e-3,
                        "{name} prompt {i} position {pos}: {have} vs reference {want}"
                    );
                    compared += 1;
                }
            }
        }
        assert!(
            compared > 0 || !name.contains("mini512"),
            "{name}: nothing compared"
        );
        let _ = stop.send(());
        rt.block_on(server).unwrap().unwrap();
    }
}
