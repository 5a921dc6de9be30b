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
