//! Per-sequence state: for every layer either the DeltaNet conv + recurrent state or the KV
//! cache, plus how many tokens the sequence has consumed.

use myriad_kernels::Backend;

/// One layer's state for one sequence.
pub enum LayerState<B: Backend> {
    DeltaNet(B::DeltaState),
    Attention(B::KvCache),
}

/// Everything the attention side keeps for one sequence.
pub struct SequenceState<B: Backend> {
    pub(crate) layers: Vec<LayerState<B>>,
    pub(crate) len: usize,
}

impl<B: Backend> SequenceState<B> {
    /// Tokens consumed so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn layer(&self, l: usize) -> &LayerState<B> {
        &self.layers[l]
    }

    pub fn layers(&self) -> &[LayerState<B>] {
        &self.layers
    }
}

impl<B: Backend> crate::forward::Model<B> {
    /// A sequence that holds `tokens` tokens of pseudo-random keys and values (unit scale,
    /// from `seed`) in every attention layer and zero DeltaNet states: what a decode step at
    /// that context costs, without prefilling it (for benchmarks; its outputs mean nothing).
    pub fn synthetic_sequence(
        &self,
        tokens: usize,
        seed: u64,
    ) -> Result<SequenceState<B>, crate::EngineError> {
        let b = &**self.backend();
        let dims = crate::weights::attention_dims(self.config());
        let values = tokens * dims.num_kv_heads * dims.head_dim;
        let mut rng = crate::rng::Rng::new(seed);
        let mut fill = || -> Vec<f32> {
            (0..values)
                .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
                .collect()
        };
        let mut seq = self.new_sequence();
        for layer in seq.layers.iter_mut() {
            if let LayerState::Attention(_) = layer {
                let host = myriad_kernels::KvCacheHost {
                    len: tokens,
                    keys: fill(),
                    values: fill(),
                };
                *layer =
                    LayerState::Attention(b.kv_cache_from_host(&dims, &self.kv_spec(), &host)?);
            }
        }
        seq.len = tokens;
        Ok(seq)
    }
}
