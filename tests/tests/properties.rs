//! End-to-end properties of the engine on a real fixture model (qwen3_5_moe-mini512: 512
//! experts, top-10, sharded checkpoint):
//! - cutting a sequence into any chunks (down to one-token decode steps) gives the logits of
//!   one pass over it, within the tolerance between chunked and recurrent DeltaNet forms;
//! - a batch of N requests gives exactly (bitwise) what N single runs give;
//! - seeded sampling is reproducible, alone or in a batch.

#![allow(clippy::unwrap_used)]

use std::sync::OnceLock;

use myriad::local::LocalEngine;
use myriad_attention::{Request, SamplingParams, Trace};
use myriad_kernels::{Routes, SeqSpan};
use myriad_tests::{engine, fixture, max_abs_diff};
use proptest::prelude::*;

fn shared() -> &'static LocalEngine {
    static E: OnceLock<LocalEngine> = OnceLock::new();
    E.get_or_init(|| engine(&fixture("qwen3_5_moe-mini512")))
}

fn tokens(seed: u64, len: usize, vocab: usize) -> Vec<u32> {
    let mut rng = myriad_attention::rng::Rng::new(seed);
    (0..len)
        .map(|_| (rng.next_u64() % (vocab as u64 - 16)) as u32)
        .collect()
}

/// Router logits and chosen experts of every (layer, token), in token order.
#[derive(Default)]
struct Routing {
    logits: Vec<Vec<f32>>,
    chosen: Vec<Vec<Vec<u32>>>,
}

impl Trace for Routing {
    fn router_logits(&mut self, l: usize, x: &[f32]) {
        if self.logits.len() <= l {
            self.logits.resize(l + 1, Vec::new());
        }
        self.logits[l].extend_from_slice(x);
    }
    fn routes(&mut self, l: usize, r: &Routes) {
        if self.chosen.len() <= l {
            self.chosen.resize(l + 1, Vec::new());
        }
        for i in 0..r.rows() {
            let mut e = r.row(i).0.to_vec();
            e.sort_unstable();
            self.chosen[l].push(e);
        }
    }
}

/// Logits of every position when `toks` is fed in chunks of the given sizes, and the routing.
fn chunked_logits(e: &LocalEngine, toks: &[u32], cuts: &[usize]) -> (Vec<f32>, Routing) {
    let model = e.engine.model();
    let mut seq = model.new_sequence();
    let mut out = Vec::new();
    let mut routing = Routing::default();
    let mut done = 0;
    let mut sizes = cuts.iter().copied().chain(std::iter::repeat(1));
    while done < toks.len() {
        let n = sizes.next().unwrap().clamp(1, toks.len() - done);
        let spans = [SeqSpan {
            start: 0,
            len: n,
            past: done,
        }];
        let rows: Vec<usize> = (0..n).collect();
        out.extend(
            model
                .forward(
                    &toks[done..done + n],
                    &spans,
                    &mut [&mut seq],
                    &rows,
                    Some(&mut routing),
                )
                .unwrap(),
        );
        done += n;
    }
    (out, routing)
}

/// The gap between the k-th and (k+1)-th router logits at the first (token, layer), in causal
/// order, where two runs chose different experts; None if they never did.
fn first_routing_difference(a: &Routing, b: &Routing, experts: usize, k: usize) -> Option<f32> {
    let tokens = a.chosen.first().map_or(0, Vec::len);
    for t in 0..tokens {
        for l in 0..a.chosen.len() {
            if a.chosen[l][t] != b.chosen[l][t] {
                let mut row = a.logits[l][t * experts..(t + 1) * experts].to_vec();
                row.sort_by(|x, y| y.total_cmp(x));
                return Some(row[k - 1] - row[k]);
            }
        }
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Any chunking of a sequence, including prefill followed by single-token decode steps,
    /// matches one pass over it. Top-k routing is discontinuous: where the k-th and (k+1)-th
    /// router logits are within float32 rounding of each other, the two evaluation orders may
    /// legitimately pick different experts (the fixtures avoid this by redrawing prompts whose
    /// gaps are below 1e-4); such inputs are discarded, any other difference fails.
    #[test]
    fn chunked_prefill_and_decode_match_one_pass(
        seed in any::<u64>(),
        len in 2usize..150,
        cuts in proptest::collection::vec(1usize..80, 0..4),
    ) {
        let e = shared();
        let toks = tokens(seed, len, e.config.vocab_size);
        let (one, ra) = chunked_logits(e, &toks, &[len]);
        let (pieces, rb) = chunked_logits(e, &toks, &cuts);
        if let Some(gap) = first_routing_difference(&ra, &rb, e.config.num_experts, e.config.num_experts_per_tok) {
            prop_assert!(gap < 1e-4, "routing differs where the top-k gap is {gap}, with cuts {cuts:?}");
            prop_assume!(false, "router near-tie");
        }
        let d = max_abs_diff(&one, &pieces);
        prop_assert!(d < 1e-3, "max logit difference {d} with cuts {cuts:?}");
    }
}

fn request(prompt: Vec<u32>, seed: Option<u64>, temperature: f32) -> Request {
    Request {
        prompt,
        max_tokens: 8,
        sampling: SamplingParams {
            temperature,
            top_p: 0.9,
            top_k: 50,
            seed,
        },
        ignore_eos: true,
        stop_token_ids: Vec::new(),
        logprobs: Some(3),
        echo: true,
    }
}

#[test]
fn a_batch_equals_single_runs_bitwise() {
    let e = shared();
    let v = e.config.vocab_size;
    let reqs: Vec<Request> = [1usize, 7, 33, 70, 5, 130]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            request(
                tokens(i as u64 + 100, len, v),
                Some(i as u64),
                if i % 2 == 0 { 0.0 } else { 0.8 },
            )
        })
        .collect();
    let batched = e.engine.generate(&reqs).unwrap();
    for (r, b) in reqs.iter().zip(&batched) {
        let single = e
            .engine
            .generate(std::slice::from_ref(r))
            .unwrap()
            .remove(0);
        assert_eq!(
            single.token_ids,
            b.token_ids,
            "tokens differ for a prompt of {}",
            r.prompt.len()
        );
        assert_eq!(
            single.logprobs,
            b.logprobs,
            "log-probabilities differ for a prompt of {}",
            r.prompt.len()
        );
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_seeds_matter() {
    let e = shared();
    let p = tokens(5, 12, e.config.vocab_size);
    let run = |seed| {
        e.engine
            .generate(&[request(p.clone(), Some(seed), 1.0)])
            .unwrap()
            .remove(0)
            .token_ids
    };
    assert_eq!(run(11), run(11));
    let others: Vec<Vec<u32>> = (12..16).map(run).collect();
    assert!(
        others.iter().any(|o| *o != run(11)),
        "different seeds should give different samples"
    );
}

#[test]
fn prompt_logprobs_match_the_forward_pass() {
    let e = shared();
    let p = tokens(9, 20, e.config.vocab_size);
    let mut r = request(p.clone(), None, 0.0);
    r.max_tokens = 0;
    let out = e.engine.generate(&[r]).unwrap().remove(0);
    let lps = out.logprobs.unwrap();
    assert_eq!(lps.len(), p.len());
    assert!(lps[0].is_none());
    let (logits, _) = chunked_logits(e, &p, &[p.len()]);
    let v = e.config.vocab_size;
    for i in 1..p.len() {
        let lp = myriad_attention::sampling::log_softmax(&logits[(i - 1) * v..i * v]);
        let got = lps[i].as_ref().unwrap();
        assert_eq!(got.token_id, p[i]);
        assert!((got.logprob - lp[p[i] as usize]).abs() < 1e-6);
        assert_eq!(got.top.len(), 3);
        assert!(got.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
    }
    assert!(out.token_ids.is_empty());
}

#[test]
fn bad_requests_are_rejected_with_a_reason() {
    let e = shared();
    let v = e.config.vocab_size as u32;
    let bad = |r: Request| {
        e.engine
            .generate(&[request(vec![1], None, 0.0), r])
            .unwrap_err()
            .to_string()
    };
    assert!(bad(request(vec![], None, 0.0)).contains("request 1: the prompt is empty"));
    let msg = bad(request(vec![3, v + 5], None, 0.0));
    assert!(
        msg.contains(&format!("prompt token 1 has id {}", v + 5)),
        "{msg}"
    );
    let long = vec![1; e.config.max_position_embeddings + 1];
    assert!(bad(request(long, None, 0.0)).contains("more than the model's context"));
    let mut r = request(vec![1], None, 0.0);
    r.sampling.top_p = 0.0;
    assert!(bad(r).contains("top_p"));
    let mut r = request(vec![1], None, 0.0);
    r.sampling.temperature = f32::NAN;
    assert!(bad(r).contains("temperature"));
}
