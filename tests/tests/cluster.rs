//! The router with expert nodes inside this process (the in-process transport): the same plan,
//! requests, node service and combine as a networked cluster, so these check the distributed
//! path's numbers and failure handling without sockets (the `myriad` binary's tests run the
//! same over QUIC between processes).

#![allow(clippy::unwrap_used)]

use myriad::cluster::{ClusterArgs, TlsArgs};
use myriad::local::{LocalEngine, LocalOptions, load_with};
use myriad_attention::{Completion, Request};
use myriad_tests::{Reference, fixture, log_softmax_rows, max_abs_diff};

fn cluster(name: &str, nodes: usize, replicas: usize, ping_pong: bool) -> LocalEngine {
    let args = ClusterArgs {
        expert_nodes: (0..nodes).map(|i| format!("node-{i}")).collect(),
        replicas,
        in_process: true,
        ping_pong,
        ..ClusterArgs::default()
    };
    load_with(
        &fixture(name),
        &LocalOptions {
            threads: 2,
            ..LocalOptions::default()
        },
        &args,
        &TlsArgs::default(),
    )
    .unwrap()
}

fn requests(r: &Reference, max_tokens: usize) -> Vec<Request> {
    (0..r.num_prompts())
        .map(|i| Request {
            ignore_eos: true,
            logprobs: Some(2),
            echo: true,
            ..Request::greedy(r.ids(&format!("prompt.{i}.input_ids")).unwrap(), max_tokens)
        })
        .collect()
}

#[test]
fn a_four_node_cluster_reproduces_the_reference_and_itself() {
    for name in ["qwen3_5_moe-mini512", "qwen3_next-mini512"] {
        let r = Reference::load(&fixture(name));
        let e = cluster(name, 4, 1, false);
        let out = e.engine.generate(&requests(&r, 16)).unwrap();
        let vocab = e.config.vocab_size;
        for (i, c) in out.iter().enumerate() {
            assert_eq!(
                c.token_ids,
                r.ids(&format!("prompt.{i}.greedy_ids")).unwrap(),
                "{name} prompt {i}"
            );
            // Echoed prompt log-probs against the reference prefill logits.
            if let Some(want) = r.f32(&format!("prompt.{i}.logits")) {
                let want_lp = log_softmax_rows(&want.data, vocab);
                let lps = c.logprobs.as_ref().unwrap();
                let prompt = &c.prompt_token_ids;
                let got: Vec<f32> = (1..prompt.len())
                    .map(|p| lps[p].as_ref().unwrap().logprob)
                    .collect();
                let exp: Vec<f32> = (1..prompt.len())
                    .map(|p| want_lp[(p - 1) * vocab + prompt[p] as usize])
                    .collect();
                assert!(max_abs_diff(&got, &exp) < 1e-3, "{name} prompt {i}");
            }
        }
        // Same placement, same combine order: a second run is bit-for-bit the same.
        let again = e.engine.generate(&requests(&r, 16)).unwrap();
        for (a, b) in out.iter().zip(&again) {
            assert_eq!(a.token_ids, b.token_ids);
            assert_eq!(a.logprobs, b.logprobs);
        }
        let s = e.experts.router.as_ref().unwrap().stats();
        assert!(s.calls > 0 && s.bytes_sent > 0 && s.failovers == 0);
    }
}

#[test]
fn ping_pong_micro_batches_give_the_same_results() {
    let name = "qwen3_5_moe-mini512";
    let r = Reference::load(&fixture(name));
    let plain = cluster(name, 4, 1, false)
        .engine
        .generate(&requests(&r, 12))
        .unwrap();
    let pp = cluster(name, 4, 1, true)
        .engine
        .generate(&requests(&r, 12))
        .unwrap();
    for (a, b) in plain.iter().zip(&pp) {
        assert_eq!(a.token_ids, b.token_ids);
        assert_eq!(a.logprobs, b.logprobs);
    }
}

fn tokens(c: &[Completion]) -> Vec<Vec<u32>> {
    c.iter().map(|c| c.token_ids.clone()).collect()
}

#[test]
fn a_lost_node_fails_over_to_replicas_and_a_lost_expert_is_a_clear_error() {
    let name = "qwen3_next-mini512";
    let r = Reference::load(&fixture(name));
    let e = cluster(name, 4, 2, false);
    let before = e.engine.generate(&requests(&r, 16)).unwrap();
    let network = e.experts.network.as_ref().unwrap();
    assert!(network.unregister("node-1"));
    let after = e.engine.generate(&requests(&r, 16)).unwrap();
    assert_eq!(tokens(&before), tokens(&after));
    let stats = e.experts.router.as_ref().unwrap().stats();
    assert!(stats.failovers >= 1, "the router should have failed over");
    // Replicas form a ring: node 2's own range is also held only by node 1. With both gone,
    // its experts have no holder and the request ends with an error that says so.
    assert!(network.unregister("node-2"));
    let err = e.engine.generate(&requests(&r, 4)).unwrap_err().to_string();
    assert!(
        err.contains("unavailable") && err.contains("expert"),
        "{err}"
    );
}
