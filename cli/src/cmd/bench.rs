//! `myriad bench decode|prefill`: throughput beside the ceilings measured in the same run.
//!
//! Decode is memory-bound, so each run reports the weight bytes one token reads (dense
//! matrices once per step shared by the batch, one embedding row per token, and every
//! distinct routed expert the step actually touched) and the fraction of the memory roofline
//! `tokens/s × bytes/token ÷ bandwidth`. Prefill is compute-bound and is reported beside the
//! GEMM peak of our own kernels. Run these on a release build.

use std::path::PathBuf;
use std::time::Instant;

use crate::device::Device;
use anyhow::Result;
use clap::{Args, Subcommand};
use myriad_attention::sampling::argmax;
use myriad_attention::{Batch, SequenceState, Trace};
use myriad_kernels::probe::{ReadProbe, matmul_gflops};
use myriad_kernels::{Routes, SeqSpan, WeightDtype};
use myriad_model::{Family, LayerKind, ModelConfig, Preset};
use serde_json::{Value, json};

use crate::cmd::generate::OutputFormat;
use crate::local::LocalEngine;
use crate::runtime::RuntimeArgs;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Decode tokens/s at several batch sizes against the memory-bandwidth roofline.
    Decode(DecodeArgs),
    /// Prefill tokens/s of one long prompt against the measured matmul peak.
    Prefill(PrefillArgs),
    /// Expert dispatch: per-layer round trips and wire bytes; cluster vs single-process decode.
    Dispatch(crate::cmd::bench_dispatch::DispatchArgs),
    /// Control plane: imbalance before/after a rebalance, step times during it, failover time.
    Control(crate::cmd::bench_control::ControlBenchArgs),
    /// Long contexts: state bytes per token (computed and measured from the KV pool), and a
    /// batch-1 decode step at each context against the roofline of weights plus KV read.
    Context(crate::cmd::bench_context::ContextArgs),
    /// State transfer from a prefill node to a decode node (QUIC, mutual TLS, loopback)
    /// against a memcpy of the same bytes.
    Transfer(crate::cmd::bench_transfer::TransferArgs),
}

#[derive(Args, Debug)]
pub struct CommonArgs {
    /// Model directory (default: the built-in `bench` preset, made on first use: 6.7 GB).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Args, Debug)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence before decoding starts.
    #[arg(long, default_value_t = 16)]
    pub prompt_len: usize,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Untimed decode steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
}

#[derive(Args, Debug)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Prompt length.
    #[arg(long, default_value_t = 4096)]
    pub prompt_len: usize,
    /// Timed prefills (the best is reported).
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
}

/// Ceilings measured on this machine now.
pub(crate) struct Ceilings {
    pub(crate) bandwidth_gb_s: f64,
    pub(crate) matmul_gflop_s: f64,
    pub(crate) probe: ReadProbe,
}

pub(crate) fn ceilings(e: &LocalEngine) -> Ceilings {
    let (pool, isa) = (e.backend.pool(), e.backend.isa());
    let probe = ReadProbe::new(1 << 30);
    Ceilings {
        bandwidth_gb_s: probe.gb_s(pool, isa, 1 << 30, 5),
        probe,
        matmul_gflop_s: matmul_gflops(
            pool,
            isa,
            e.backend.precision(),
            512,
            4096,
            1024,
            WeightDtype::BF16,
            3,
        ),
    }
}

/// Read bandwidth (GB/s) right now: the median of three 256 MiB passes. Taken just before
/// and after each timed window, so a decode figure is compared with the memory system the
/// host gave us at that moment (this VM's bandwidth swings by ±30% within a minute).
pub(crate) fn bandwidth_now(e: &LocalEngine, probe: &ReadProbe) -> f64 {
    let (pool, isa) = (e.backend.pool(), e.backend.isa());
    let mut v: Vec<f64> = (0..3)
        .map(|_| probe.gb_s(pool, isa, 256 << 20, 1))
        .collect();
    v.sort_by(f64::total_cmp);
    v[1]
}

pub(crate) fn load(c: &CommonArgs) -> Result<LocalEngine> {
    let dir = match &c.model {
        Some(d) => d.clone(),
        None => crate::builtin::ensure(Preset::Bench, Family::Qwen35Moe)?,
    };
    let e = crate::local::load(&dir, &c.runtime.options())?;
    eprintln!(
        "loaded {} in {:.1} s on {}",
        dir.display(),
        e.load_seconds,
        myriad_kernels::Backend::name(&*e.backend)
    );
    Ok(e)
}

/// Random prompt tokens from a seeded generator (regular vocabulary only).
pub(crate) fn prompt(config: &ModelConfig, len: usize, seed: u64) -> Vec<u32> {
    let mut rng = myriad_attention::rng::Rng::new(seed);
    let regular = (config.vocab_size * 9 / 10).max(1) as u64;
    (0..len)
        .map(|_| (rng.next_u64() % regular) as u32)
        .collect()
}

/// Counts the distinct experts each layer's routing touches.
#[derive(Default)]
pub(crate) struct ExpertsTouched {
    pub(crate) distinct: usize,
}

impl Trace for ExpertsTouched {
    fn wants_tensors(&self) -> bool {
        false
    }
    fn routes(&mut self, _layer: usize, routes: &Routes) {
        let mut e: Vec<u32> = routes.experts().to_vec();
        e.sort_unstable();
        e.dedup();
        self.distinct += e.len();
    }
}

pub fn run(cmd: &BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Decode(a) => decode(a),
        BenchCmd::Prefill(a) => prefill(a),
        BenchCmd::Dispatch(a) => crate::cmd::bench_dispatch::run(a),
        BenchCmd::Control(a) => crate::cmd::bench_control::run(a),
        BenchCmd::Context(a) => crate::cmd::bench_context::run(a),
        BenchCmd::Transfer(a) => crate::cmd::bench_transfer::run(a),
    }
}

/// One decode measurement.
pub(crate) struct DecodeResult {
    pub(crate) tokens_per_s: f64,
    seconds: f64,
    /// Distinct experts touched per step (None under ping-pong, which runs untraced).
    experts_per_step: Option<f64>,
}

/// Prefills `bsz` random prompts of `prompt_len` tokens, then times `steps` greedy decode steps
/// after `warmup` untimed ones. With `ping_pong`, each step runs as two micro-batches.
pub(crate) fn decode_run(
    e: &LocalEngine,
    bsz: usize,
    prompt_len: usize,
    warmup: usize,
    steps: usize,
    seed: u64,
    ping_pong: bool,
) -> Result<DecodeResult> {
    let model = e.engine.model();
    let vocab = e.config.vocab_size;
    let mut seqs: Vec<SequenceState<Device>> = (0..bsz).map(|_| model.new_sequence()).collect();
    let mut tokens = Vec::new();
    let mut spans = Vec::new();
    for i in 0..bsz {
        spans.push(SeqSpan {
            start: tokens.len(),
            len: prompt_len,
            past: 0,
        });
        tokens.extend(prompt(&e.config, prompt_len, seed + i as u64));
    }
    let rows: Vec<usize> = spans.iter().map(|s| s.start + s.len - 1).collect();
    let mut refs: Vec<&mut SequenceState<Device>> = seqs.iter_mut().collect();
    let logits = model.forward(&tokens, &spans, &mut refs, &rows, None)?;
    let mut next: Vec<u32> = logits.chunks_exact(vocab).map(argmax).collect();
    let mut touched = ExpertsTouched::default();
    let mut seconds = 0.0;
    let half = bsz / 2;
    for step in 0..warmup + steps {
        let past = prompt_len + step;
        let timed = step >= warmup;
        let t0 = Instant::now();
        let logits = if ping_pong && bsz >= 2 {
            let (sa, sb) = refs.split_at_mut(half);
            let spans_a: Vec<SeqSpan> = (0..half)
                .map(|i| SeqSpan {
                    start: i,
                    len: 1,
                    past,
                })
                .collect();
            let spans_b: Vec<SeqSpan> = (0..bsz - half)
                .map(|i| SeqSpan {
                    start: i,
                    len: 1,
                    past,
                })
                .collect();
            let (rows_a, rows_b): (Vec<usize>, Vec<usize>) =
                ((0..half).collect(), (0..bsz - half).collect());
            let (la, lb) = model.forward_pingpong(
                Batch {
                    tokens: &next[..half],
                    spans: &spans_a,
                    seqs: sa,
                    logit_rows: &rows_a,
                },
                Batch {
                    tokens: &next[half..],
                    spans: &spans_b,
                    seqs: sb,
                    logit_rows: &rows_b,
                },
            )?;
            [la, lb].concat()
        } else {
            let spans: Vec<SeqSpan> = (0..bsz)
                .map(|i| SeqSpan {
                    start: i,
                    len: 1,
                    past,
                })
                .collect();
            let rows: Vec<usize> = (0..bsz).collect();
            let trace: Option<&mut dyn Trace> = if timed { Some(&mut touched) } else { None };
            model.forward(&next, &spans, &mut refs, &rows, trace)?
        };
        next = logits.chunks_exact(vocab).map(argmax).collect();
        if timed {
            seconds += t0.elapsed().as_secs_f64();
        }
    }
    Ok(DecodeResult {
        tokens_per_s: (bsz * steps) as f64 / seconds,
        seconds,
        experts_per_step: (!(ping_pong && bsz >= 2))
            .then(|| touched.distinct as f64 / steps as f64),
    })
}

fn decode(a: &DecodeArgs) -> Result<()> {
    let e = load(&a.common)?;
    let ceil = ceilings(&e);
    let model = e.engine.model();
    let expert_bytes = e.experts.expert_bytes;
    let mut runs = Vec::new();
    for &bsz in &a.batch {
        let bw_before = bandwidth_now(&e, &ceil.probe);
        let r = decode_run(
            &e,
            bsz,
            a.prompt_len,
            a.warmup,
            a.steps,
            a.common.seed,
            false,
        )?;
        let bw = (bw_before + bandwidth_now(&e, &ceil.probe)) / 2.0;
        let experts = r.experts_per_step.unwrap_or(0.0);
        let bytes_per_step = model.dense_bytes_per_step(bsz) as f64 + experts * expert_bytes as f64;
        let active = bytes_per_step / bsz as f64;
        let fraction = r.tokens_per_s * active / (bw * 1e9);
        eprintln!(
            "decode batch {bsz:>3}: {:>8.1} tokens/s, {:>6.1} MB/token ({experts:.0} experts/step), {:.0}% of the {bw:.1} GB/s roofline measured around it ({:.0}% of the run's best {:.1} GB/s)",
            r.tokens_per_s,
            active / 1e6,
            fraction * 100.0,
            r.tokens_per_s * active / (ceil.bandwidth_gb_s * 1e9) * 100.0,
            ceil.bandwidth_gb_s
        );
        runs.push(json!({
            "batch_size": bsz,
            "tokens_per_s": r.tokens_per_s,
            "active_bytes_per_token": active,
            "roofline_fraction": fraction,
            "bandwidth_gb_s": bw,
            "roofline_tokens_per_s": bw * 1e9 / active,
            "roofline_fraction_vs_best_bandwidth": r.tokens_per_s * active / (ceil.bandwidth_gb_s * 1e9),
            "step_ms": r.seconds * 1e3 / a.steps as f64,
            "experts_touched_per_step": experts,
        }));
    }
    report(&a.common, &ceil, "decode", runs)
}

/// Multiply-adds per prefilled token, excluding `lm_head` (only the last row needs logits)
/// but including attention over an average context of `len / 2`.
fn prefill_flops_per_token(c: &ModelConfig, len: usize) -> f64 {
    let h = c.hidden_size as f64;
    let mut macs = 0.0;
    for kind in &c.layer_kinds {
        macs += match kind {
            LayerKind::LinearAttention => {
                let proj =
                    (2 * c.key_dim() + 2 * c.value_dim() + 2 * c.linear_num_value_heads) as f64;
                let state = (c.linear_num_value_heads
                    * c.linear_key_head_dim
                    * c.linear_value_head_dim) as f64;
                (proj + c.value_dim() as f64) * h + 4.0 * state
            }
            LayerKind::FullAttention => {
                let (nh, nkv, hd) = (
                    c.num_attention_heads as f64,
                    c.num_kv_heads as f64,
                    c.head_dim as f64,
                );
                (2.0 * nh * hd + 2.0 * nkv * hd + nh * hd) * h + 2.0 * nh * hd * (len as f64 / 2.0)
            }
        };
        let (e, k, i, is) = (
            c.num_experts as f64,
            c.num_experts_per_tok as f64,
            c.moe_intermediate_size as f64,
            c.shared_expert_intermediate_size as f64,
        );
        macs += e * h + k * 3.0 * h * i + (2.0 * is + 1.0) * h + is * h;
    }
    2.0 * macs
}

fn prefill(a: &PrefillArgs) -> Result<()> {
    let e = load(&a.common)?;
    let ceil = ceilings(&e);
    let model = e.engine.model();
    let tokens = prompt(&e.config, a.prompt_len, a.common.seed);
    let chunk = e.engine.config().max_batch_tokens;
    let mut best = f64::INFINITY;
    for _ in 0..a.repeats.max(1) {
        let mut seq = model.new_sequence();
        let t0 = Instant::now();
        let mut done = 0;
        while done < tokens.len() {
            let n = chunk.min(tokens.len() - done);
            let spans = [SeqSpan {
                start: 0,
                len: n,
                past: done,
            }];
            let rows: Vec<usize> = if done + n == tokens.len() {
                vec![n - 1]
            } else {
                Vec::new()
            };
            model.forward(
                &tokens[done..done + n],
                &spans,
                &mut [&mut seq],
                &rows,
                None,
            )?;
            done += n;
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let tokens_per_s = a.prompt_len as f64 / best;
    let gflop_s = tokens_per_s * prefill_flops_per_token(&e.config, a.prompt_len) / 1e9;
    eprintln!(
        "prefill {} tokens: {tokens_per_s:.1} tokens/s ({best:.2} s), {gflop_s:.1} GFLOP/s = {:.0}% of the measured {:.1} GFLOP/s matmul peak",
        a.prompt_len,
        gflop_s / ceil.matmul_gflop_s * 100.0,
        ceil.matmul_gflop_s
    );
    let runs = vec![json!({
        "prompt_tokens": a.prompt_len,
        "chunk_tokens": chunk,
        "seconds": best,
        "tokens_per_s": tokens_per_s,
        "gflop_s": gflop_s,
        "matmul_peak_fraction": gflop_s / ceil.matmul_gflop_s,
    })];
    report(&a.common, &ceil, "prefill", runs)
}

pub(crate) fn report(c: &CommonArgs, ceil: &Ceilings, kind: &str, runs: Vec<Value>) -> Result<()> {
    if c.output == OutputFormat::Json {
        println!(
            "{}",
            json!({
                "bench": kind,
                "bandwidth_gb_s": ceil.bandwidth_gb_s,
                "matmul_gflop_s": ceil.matmul_gflop_s,
                "runs": runs,
            })
        );
    } else {
        eprintln!(
            "ceilings: read bandwidth {:.1} GB/s, matmul peak {:.1} GFLOP/s",
            ceil.bandwidth_gb_s, ceil.matmul_gflop_s
        );
    }
    Ok(())
}
