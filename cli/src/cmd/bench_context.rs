//! `myriad bench context`: what long contexts cost.
//!
//! 1. State bytes per token of context: a hybrid model keeps per-token state (KV) only in its
//!    full-attention layers, against an all-full-attention model of the same shape; computed
//!    for Qwen3.5-397B-A17B (spec §5.2) and for the loaded model, and measured from the block
//!    pool for the loaded model (blocks alive × block bytes, rounding and scales included).
//! 2. A batch-1 decode step at each context, its KV filled synthetically (a decode step costs
//!    the same whatever the keys hold, so no prefill is needed), against the roofline that
//!    counts the weight bytes the step reads (dense, plus the routed experts it touched) and the
//!    KV and DeltaNet state bytes it reads.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use myriad_attention::sampling::argmax;
use myriad_attention::{LayerState, Trace};
use myriad_kernels::{Backend, SeqSpan};
use myriad_model::{LayerKind, ModelConfig};
use serde_json::{Value, json};

use crate::cmd::bench::{
    CommonArgs, ExpertsTouched, bandwidth_now, ceilings, load, prompt, report,
};

#[derive(Args, Debug)]
pub struct ContextArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Context lengths to decode at (tokens already in the KV cache).
    #[arg(long, value_delimiter = ',', default_value = "1024,32768,131072")]
    pub context: Vec<usize>,
    /// Timed decode steps per context.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Untimed decode steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
}

/// Per-token and fixed state of a model shape, in bytes.
struct StateShape {
    /// KV bytes per token of the hybrid model (its full-attention layers).
    kv_per_token: f64,
    /// KV bytes per token if every layer were full attention.
    all_attention_per_token: f64,
    /// DeltaNet state per sequence, whatever its length.
    fixed: f64,
}

impl StateShape {
    fn of(c: &ModelConfig, kv_bytes: usize, conv_bytes: usize) -> Self {
        let full = c
            .layer_kinds
            .iter()
            .filter(|k| **k == LayerKind::FullAttention)
            .count() as f64;
        let linear = c.layer_kinds.len() as f64 - full;
        let per_layer = (2 * c.num_kv_heads * c.head_dim * kv_bytes) as f64;
        let conv = (c.linear_conv_kernel.saturating_sub(1) * c.conv_dim() * conv_bytes) as f64;
        let recurrent =
            (c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4) as f64;
        StateShape {
            kv_per_token: full * per_layer,
            all_attention_per_token: c.layer_kinds.len() as f64 * per_layer,
            fixed: linear * (conv + recurrent),
        }
    }

    fn json(&self) -> Value {
        json!({
            "kv_bytes_per_token": self.kv_per_token,
            "all_attention_kv_bytes_per_token": self.all_attention_per_token,
            "hybrid_fraction": self.kv_per_token / self.all_attention_per_token,
            "fixed_bytes_per_sequence": self.fixed,
        })
    }
}

/// Qwen3.5-397B-A17B (spec §1.2, §5.2): 60 layers, 15 of them full attention with 2 KV heads
/// of 256, DeltaNet with 64 value heads of 128×128 and a conv of 12,288 channels × 3; KV and
/// conv state in bf16, the recurrent state in f32.
fn qwen35_397b() -> StateShape {
    let (layers, full) = (60.0, 15.0);
    let per_layer = 2.0 * 2.0 * 256.0 * 2.0;
    StateShape {
        kv_per_token: full * per_layer,
        all_attention_per_token: layers * per_layer,
        fixed: (layers - full) * (64.0 * 128.0 * 128.0 * 4.0 + 12288.0 * 3.0 * 2.0),
    }
}

pub fn run(a: &ContextArgs) -> Result<()> {
    let e = load(&a.common)?;
    let ceil = ceilings(&e);
    let model = e.engine.model();
    let backend = &*e.backend;
    let spec = model.kv_spec();
    let big = qwen35_397b();
    let ours = StateShape::of(&e.config, spec.dtype.size(), 4);
    eprintln!(
        "state per token of context: Qwen3.5-397B-A17B {:.0} B (bf16 KV; {:.0} B if all 60 layers \
         were full attention: {:.0}%), plus {:.0} MB fixed DeltaNet state per sequence",
        big.kv_per_token,
        big.all_attention_per_token,
        100.0 * big.kv_per_token / big.all_attention_per_token,
        big.fixed / 1e6
    );
    eprintln!(
        "this model: {:.0} B per token ({} KV; {:.0} B all-attention), {:.2} MB fixed",
        ours.kv_per_token,
        spec.dtype.name(),
        ours.all_attention_per_token,
        ours.fixed / 1e6
    );
    let vocab = e.config.vocab_size;
    let mut runs = Vec::new();
    for &context in &a.context {
        let mut seq = model.synthetic_sequence(context, a.common.seed)?;
        let blocks = backend.kv_blocks_live();
        let fixed_measured: usize = seq
            .layers()
            .iter()
            .map(|l| match l {
                LayerState::DeltaNet(d) => {
                    let h = backend.delta_state_to_host(d);
                    4 * (h.conv.len() + h.recurrent.len())
                }
                LayerState::Attention(_) => 0,
            })
            .sum();
        let pool_bytes = blocks * model.kv_block_bytes();
        let mut next = prompt(&e.config, 1, a.common.seed)[0];
        let mut touched = ExpertsTouched::default();
        let bw_before = bandwidth_now(&e, &ceil.probe);
        let mut seconds = 0.0;
        for step in 0..a.warmup + a.steps {
            let timed = step >= a.warmup;
            let span = SeqSpan {
                start: 0,
                len: 1,
                past: context + step,
            };
            let trace: Option<&mut dyn Trace> = if timed { Some(&mut touched) } else { None };
            let t0 = Instant::now();
            let logits = model.forward(&[next], &[span], &mut [&mut seq], &[0], trace)?;
            if timed {
                seconds += t0.elapsed().as_secs_f64();
            }
            next = argmax(&logits[..vocab]);
        }
        let bw = (bw_before + bandwidth_now(&e, &ceil.probe)) / 2.0;
        let step_s = seconds / a.steps as f64;
        let experts = touched.distinct as f64 / a.steps as f64;
        let weights =
            model.dense_bytes_per_step(1) as f64 + experts * e.experts.expert_bytes as f64;
        let kv = pool_bytes as f64;
        // The recurrent state is read and written once per step.
        let state = 2.0 * fixed_measured as f64;
        let roofline_s = (weights + kv + state) / (bw * 1e9);
        eprintln!(
            "context {context:>8}: step {:>7.2} ms, roofline {:>7.2} ms ({:.0}%) at {bw:.1} GB/s: \
             weights {:.0} MB + KV {:.0} MB + DeltaNet state {:.1} MB; pool {:.0} B/token",
            step_s * 1e3,
            roofline_s * 1e3,
            100.0 * roofline_s / step_s,
            weights / 1e6,
            kv / 1e6,
            state / 1e6,
            kv / context as f64
        );
        runs.push(json!({
            "context": context,
            "step_ms": step_s * 1e3,
            "roofline_ms": roofline_s * 1e3,
            "roofline_fraction": roofline_s / step_s,
            "bandwidth_gb_s": bw,
            "weight_bytes_per_step": weights,
            "kv_bytes_per_step": kv,
            "deltanet_state_bytes_per_step": state,
            "experts_touched_per_step": experts,
            "kv_blocks": blocks,
            "measured_kv_bytes_per_token": kv / context as f64,
            "measured_fixed_bytes_per_sequence": fixed_measured,
        }));
        drop(seq);
    }
    runs.push(json!({
        "state_bytes": {
            "qwen3.5-397b-a17b": big.json(),
            "this_model": ours.json(),
        }
    }));
    report(&a.common, &ceil, "context", runs)
}
