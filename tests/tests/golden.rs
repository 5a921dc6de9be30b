//! Golden tests: every public fixture, run by the single-process engine, against the float32
//! transformers reference (`../shared/fixtures/README.md` states the tolerances).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use myriad_attention::{LayerState, Request, SequenceState, Trace};
use myriad_kernels::cpu::CpuBackend;
use myriad_kernels::{Backend, Routes, SeqSpan};
use myriad_tests::{Reference, Report, engine, fixture, log_softmax_rows, max_abs, repo_fixture};

/// Logits: the reference's own kernels differ by ≤ 4e-5 and logit std is about 2.
const LOGIT_TOL: f32 = 1e-3;

#[derive(Default)]
struct Recorder {
    tensors: BTreeMap<String, Vec<f32>>,
    routes: BTreeMap<usize, Routes>,
}

impl Trace for Recorder {
    fn embeddings(&mut self, x: &[f32]) {
        self.tensors.insert("debug.embeddings".into(), x.to_vec());
    }
    fn mixer_out(&mut self, l: usize, x: &[f32]) {
        self.tensors
            .insert(format!("debug.layer.{l}.mixer_out"), x.to_vec());
    }
    fn router_logits(&mut self, l: usize, logits: &[f32]) {
        self.tensors
            .insert(format!("debug.layer.{l}.router_logits"), logits.to_vec());
    }
    fn routes(&mut self, l: usize, routes: &Routes) {
        self.routes.insert(l, routes.clone());
    }
    fn shared_expert_gate(&mut self, l: usize, g: &[f32]) {
        self.tensors
            .insert(format!("debug.layer.{l}.shared_expert_gate"), g.to_vec());
    }
    fn moe_out(&mut self, l: usize, x: &[f32]) {
        self.tensors
            .insert(format!("debug.layer.{l}.moe_out"), x.to_vec());
    }
    fn layer_output(&mut self, l: usize, x: &[f32]) {
        self.tensors
            .insert(format!("debug.layer.{l}.output"), x.to_vec());
    }
    fn final_norm(&mut self, x: &[f32]) {
        self.tensors.insert("debug.final_norm".into(), x.to_vec());
    }
}

/// Runs `tokens` through a fresh sequence in one forward call; logits of every row.
fn prefill(
    e: &myriad::local::LocalEngine,
    tokens: &[u32],
    trace: Option<&mut dyn Trace>,
) -> (Vec<f32>, SequenceState<CpuBackend>) {
    let model = e.engine.model();
    let mut seq = model.new_sequence();
    let rows: Vec<usize> = (0..tokens.len()).collect();
    let spans = [SeqSpan {
        start: 0,
        len: tokens.len(),
        past: 0,
    }];
    let logits = model
        .forward(tokens, &spans, &mut [&mut seq], &rows, trace)
        .unwrap();
    (logits, seq)
}

/// Checks a fixture by name (under `../shared/fixtures`) or by path.
fn check_fixture(name: &str) {
    let dir = if std::path::Path::new(name).is_absolute() {
        std::path::PathBuf::from(name)
    } else {
        fixture(name)
    };
    let r = Reference::load(&dir);
    let e = engine(&dir);
    let model = e.engine.model();
    let vocab = e.config.vocab_size;
    let mut rep = Report::default();

    for i in 0..r.num_prompts() {
        let ids = r.ids(&format!("prompt.{i}.input_ids")).unwrap();
        // Prefill logits and log-probabilities at every position (chunked DeltaNet path).
        let (logits, _) = prefill(&e, &ids, None);
        if let Some(want) = r.f32(&format!("prompt.{i}.logits")) {
            rep.close(
                &format!("prompt {i} logits"),
                &logits,
                &want.data,
                LOGIT_TOL,
            );
            rep.close(
                &format!("prompt {i} log-probs"),
                &log_softmax_rows(&logits, vocab),
                &log_softmax_rows(&want.data, vocab),
                LOGIT_TOL,
            );
        }
        // Greedy generation through the engine (cache, recurrent decode).
        let want_ids = r.ids(&format!("prompt.{i}.greedy_ids")).unwrap();
        let mut req = Request::greedy(ids.clone(), want_ids.len());
        req.ignore_eos = true;
        let out = e.engine.generate(&[req]).unwrap();
        rep.equal(
            &format!("prompt {i} greedy ids"),
            out[0].token_ids.clone(),
            want_ids.clone(),
        );
        // Teacher-forced decode logits against greedy_logits.
        if let Some(want) = r.f32(&format!("prompt.{i}.greedy_logits")) {
            let (logits, mut seq) = prefill(&e, &ids, None);
            let mut got = logits[(ids.len() - 1) * vocab..].to_vec();
            for (step, &t) in want_ids.iter().enumerate().take(want_ids.len() - 1) {
                let spans = [SeqSpan {
                    start: 0,
                    len: 1,
                    past: ids.len() + step,
                }];
                got.extend(
                    model
                        .forward(&[t], &spans, &mut [&mut seq], &[0], None)
                        .unwrap(),
                );
            }
            rep.close(
                &format!("prompt {i} teacher-forced decode logits"),
                &got,
                &want.data,
                LOGIT_TOL,
            );
        }
    }

    // Per-layer hidden states, router choices and states after prefilling the debug prompt.
    let di = r.debug_prompt();
    let ids = r.ids(&format!("prompt.{di}.input_ids")).unwrap();
    let mut rec = Recorder::default();
    let (_, seq) = prefill(&e, &ids, Some(&mut rec));
    let k = e.config.num_experts_per_tok;
    for (name, got) in &rec.tensors {
        let Some(want) = r.f32(name) else { continue };
        let tol = if name.contains("router_logits") || name.contains("gate") {
            1e-4
        } else {
            1e-4 * max_abs(&want.data).max(1.0)
        };
        rep.close(name, got, &want.data, tol);
    }
    for l in 0..e.config.num_layers {
        let (Some(want_ids), Some(want_w)) = (
            r.ids(&format!("debug.layer.{l}.topk_ids")),
            r.f32(&format!("debug.layer.{l}.topk_weights")),
        ) else {
            rep.fail(format!("layer {l}: reference has no top-k"));
            continue;
        };
        let routes = &rec.routes[&l];
        for t in 0..ids.len() {
            let (got_e, got_w) = routes.row(t);
            let mut a = got_e.to_vec();
            let mut b = want_ids[t * k..(t + 1) * k].to_vec();
            a.sort_unstable();
            b.sort_unstable();
            if a != b {
                rep.fail(format!(
                    "layer {l} token {t}: experts {a:?}, reference {b:?}"
                ));
            }
            rep.close(
                &format!("layer {l} token {t} top-k weights"),
                got_w,
                &want_w.data[t * k..(t + 1) * k],
                1e-5,
            );
        }
        let b = e.backend.as_ref();
        match seq.layer(l) {
            LayerState::DeltaNet(s) => {
                let host = b.delta_state_to_host(s);
                if let Some(want) = r.f32(&format!("debug.layer.{l}.conv_state")) {
                    // Reference: [channels, K] (oldest first); ours: last K-1 inputs, [K-1, channels].
                    let (ch, kk) = (want.shape[0], want.shape[1]);
                    let mut want_t = vec![0f32; (kk - 1) * ch];
                    for c in 0..ch {
                        for j in 1..kk {
                            want_t[(j - 1) * ch + c] = want.data[c * kk + j];
                        }
                    }
                    rep.close(
                        &format!("layer {l} conv state"),
                        &host.conv,
                        &want_t,
                        1e-4 * max_abs(&want_t).max(1.0),
                    );
                }
                if let Some(want) = r.f32(&format!("debug.layer.{l}.recurrent_state")) {
                    rep.close(
                        &format!("layer {l} recurrent state"),
                        &host.recurrent,
                        &want.data,
                        1e-4 * max_abs(&want.data).max(1.0),
                    );
                }
            }
            LayerState::Attention(c) => {
                let host = b.kv_cache_to_host(c);
                for (what, got) in [("key_cache", &host.keys), ("value_cache", &host.values)] {
                    let Some(want) = r.f32(&format!("debug.layer.{l}.{what}")) else {
                        continue;
                    };
                    // Reference: [kv_heads, L, head_dim]; ours: [L, kv_heads, head_dim].
                    let (nkv, len, hd) = (want.shape[0], want.shape[1], want.shape[2]);
                    let mut want_t = vec![0f32; nkv * len * hd];
                    for g in 0..nkv {
                        for t in 0..len {
                            let src = &want.data[(g * len + t) * hd..(g * len + t + 1) * hd];
                            want_t[(t * nkv + g) * hd..(t * nkv + g + 1) * hd].copy_from_slice(src);
                        }
                    }
                    rep.close(
                        &format!("layer {l} {what}"),
                        got,
                        &want_t,
                        1e-4 * max_abs(&want_t).max(1.0),
                    );
                }
            }
        }
    }

    // The batched pair: one packed forward over both prompts (no padding), then batched greedy.
    let batch_ids = r.ids("batch.input_ids").unwrap();
    let mask = r.ids("batch.attention_mask").unwrap();
    let lmax = batch_ids.len() / 2;
    let prompts: Vec<Vec<u32>> = (0..2)
        .map(|b| {
            (0..lmax)
                .filter(|&j| mask[b * lmax + j] == 1)
                .map(|j| batch_ids[b * lmax + j])
                .collect()
        })
        .collect();
    let mut s0 = model.new_sequence();
    let mut s1 = model.new_sequence();
    let tokens: Vec<u32> = prompts.concat();
    let spans = [
        SeqSpan {
            start: 0,
            len: prompts[0].len(),
            past: 0,
        },
        SeqSpan {
            start: prompts[0].len(),
            len: prompts[1].len(),
            past: 0,
        },
    ];
    let last = [prompts[0].len() - 1, tokens.len() - 1];
    let logits = model
        .forward(&tokens, &spans, &mut [&mut s0, &mut s1], &last, None)
        .unwrap();
    rep.close(
        "batch last logits",
        &logits,
        &r.f32("batch.last_logits").unwrap().data,
        LOGIT_TOL,
    );
    let want = r.ids("batch.greedy_ids").unwrap();
    let n = want.len() / 2;
    let reqs: Vec<Request> = prompts
        .iter()
        .map(|p| Request {
            ignore_eos: true,
            ..Request::greedy(p.clone(), n)
        })
        .collect();
    let out = e.engine.generate(&reqs).unwrap();
    rep.equal(
        "batch greedy ids",
        [out[0].token_ids.clone(), out[1].token_ids.clone()].concat(),
        want,
    );

    eprintln!("{name}: {} checks", rep.checks());
    rep.finish(name);
}

#[test]
fn qwen3_next_tiny() {
    check_fixture("qwen3_next-tiny");
}

#[test]
fn qwen3_next_mini512() {
    check_fixture("qwen3_next-mini512");
}

#[test]
fn qwen3_5_moe_tiny() {
    check_fixture("qwen3_5_moe-tiny");
}

#[test]
fn qwen3_5_moe_mini512() {
    check_fixture("qwen3_5_moe-mini512");
}

/// YaRN rope scaling against transformers (`tests/fixtures/README.md`).
#[test]
fn qwen3_next_tiny_yarn() {
    check_fixture(repo_fixture("qwen3_next-tiny-yarn").to_str().unwrap());
}

#[test]
fn qwen3_5_moe_tiny_yarn() {
    check_fixture(repo_fixture("qwen3_5_moe-tiny-yarn").to_str().unwrap());
}

/// Extra fixture directories made by `make_fixtures.py` with other seeds, prompts and shapes
/// (`MYRIAD_EXTRA_FIXTURES=dir1:dir2`), checked exactly like the public ones. Skipped when the
/// variable is unset.
#[test]
fn extra_fixtures_from_the_environment() {
    let Some(dirs) = std::env::var_os("MYRIAD_EXTRA_FIXTURES") else {
        eprintln!("MYRIAD_EXTRA_FIXTURES is not set: no extra fixtures checked");
        return;
    };
    for dir in std::env::split_paths(&dirs) {
        check_fixture(dir.to_str().unwrap());
    }
}
