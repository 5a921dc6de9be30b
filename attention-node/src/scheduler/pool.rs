//! The KV block pool as the scheduler sizes it: blocks from `--kv-cache-gb`, blocks a context
//! needs, and the bytes a sequence's whole state takes.

use myriad_kernels::{Backend, KvCacheSpec};
use myriad_model::{LayerKind, ModelConfig};

use crate::engine::{Engine, Request};
use crate::weights::{attention_dims, deltanet_dims};

/// Bytes of per-sequence state a sequence of `context_tokens` tokens holds with KV blocks of
/// `spec`: the blocks of every full-attention layer (keys, values and their scales), plus the
/// fixed DeltaNet conv inputs (`(conv_kernel − 1) × conv_dim`) and recurrent state
/// (`num_v_heads × k_head_dim × v_head_dim`, f32) of every linear-attention layer.
pub fn sequence_bytes(config: &ModelConfig, spec: &KvCacheSpec, context_tokens: usize) -> u64 {
    const F32: u64 = 4;
    let attention = attention_dims(config);
    let delta = deltanet_dims(config);
    let (mut full, mut linear) = (0u64, 0u64);
    for kind in &config.layer_kinds {
        match kind {
            LayerKind::FullAttention => full += 1,
            LayerKind::LinearAttention => linear += 1,
        }
    }
    let block = spec.block_bytes(attention.num_kv_heads * attention.head_dim) as u64;
    let conv = delta.conv_kernel.saturating_sub(1) as u64 * delta.conv_dim() as u64;
    let recurrent = delta.num_v_heads as u64 * delta.k_head_dim as u64 * delta.v_head_dim as u64;
    full.saturating_mul(block)
        .saturating_mul(spec.blocks_for(context_tokens) as u64)
        .saturating_add(linear.saturating_mul((conv + recurrent).saturating_mul(F32)))
}

/// The context a request may reach: its prompt and every token it may generate, but never
/// more than the model's context, where generation stops anyway.
pub(super) fn context_tokens(request: &Request, max_context: usize) -> usize {
    request
        .prompt
        .len()
        .saturating_add(request.max_tokens)
        .min(max_context)
}

/// The block pool as the handle and the thread see it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Pool {
    /// Blocks in the pool.
    pub(super) blocks: usize,
    /// Bytes of one block of one layer.
    pub(super) block_bytes: usize,
    /// Blocks of one layer per block of tokens: the model's full-attention layers.
    pub(super) layers: usize,
    pub(super) spec: KvCacheSpec,
    /// Blocks admission leaves free for running sequences to grow into.
    pub(super) headroom: usize,
}

impl Pool {
    pub(super) fn new<B: Backend>(engine: &Engine<B>, bytes: u64) -> Pool {
        let model = engine.model();
        let block_bytes = model.kv_block_bytes().max(1);
        let blocks = usize::try_from(bytes / block_bytes as u64).unwrap_or(usize::MAX);
        Pool {
            blocks,
            block_bytes,
            layers: model.attention_layers(),
            spec: model.kv_spec(),
            headroom: blocks / 100,
        }
    }

    /// Blocks a sequence of `tokens` tokens holds.
    pub(super) fn blocks_for(&self, tokens: usize) -> usize {
        self.layers.saturating_mul(self.spec.blocks_for(tokens))
    }
}
