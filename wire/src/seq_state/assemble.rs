//! The receiving side of a state transfer, without I/O: an [`Assembler`] takes the decoded
//! frames of one transfer and checks each against the header as it arrives, ending with the
//! whole [`SequenceStateImage`].

use crate::WireError;

use super::begin::StateBegin;
use super::check::{Plan, Progress};
use super::chunk::{ChunkBody, KvBlock, StateChunk, StateEnd};

/// What a receiver accepts, checked on the header alone before anything is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateLimits {
    /// Most bytes of state ([`StateBegin::state_bytes`]).
    pub max_state_bytes: u64,
    /// Most tokens the state may cover.
    pub max_position: u64,
    pub max_layers: u32,
}

impl Default for StateLimits {
    /// 64 GiB, 2 Mi tokens, 4096 layers: a 1M-token context of an 80B hybrid model (12
    /// attention layers of 2 KV heads × 256 in bf16: 24 KiB a token) is 24 GiB.
    fn default() -> Self {
        StateLimits {
            max_state_bytes: 64 << 30,
            max_position: 1 << 21,
            max_layers: 4096,
        }
    }
}

/// One sequence's state, whole: the header and every layer's data.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceStateImage {
    pub begin: StateBegin,
    /// One per `begin.layers`, of the same kind.
    pub layers: Vec<LayerImage>,
}

/// One layer's state.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerImage {
    /// Row-major `[conv_rows, conv_dim]` and `[v_heads, k_head_dim, v_head_dim]`.
    DeltaNet { conv: Vec<f32>, recurrent: Vec<f32> },
    /// `begin.blocks_for_layer(l)` blocks, block `b` holding tokens `b × block_tokens ..`.
    Attention { blocks: Vec<KvBlock> },
}

/// Receives one transfer: [`Assembler::new`] with its [`StateBegin`], [`Assembler::push`] for
/// every [`StateChunk`], [`Assembler::finish`] with its [`StateEnd`].
///
/// Chunks must arrive in order: every chunk of layer `l` before any of layer `l + 1`, and an
/// attention layer's blocks from 0 up without gaps or overlaps. That is what lets a sender
/// stream a state layer by layer as it computes it; a transport that can reorder frames must
/// restore the order before pushing.
///
/// A refused chunk leaves the assembler as it was, but the transfer is broken (the sender's
/// end will not match): drop it.
#[derive(Debug)]
pub struct Assembler {
    begin: StateBegin,
    layers: Vec<LayerImage>,
    progress: Progress,
}

impl Assembler {
    /// Starts a transfer. Refuses a header that is inconsistent
    /// ([`StateBegin::validate`]), of another model than `expect_fingerprint`, or over
    /// `limits`, all before allocating anything for the state.
    pub fn new(
        begin: StateBegin,
        expect_fingerprint: u64,
        limits: &StateLimits,
    ) -> Result<Self, WireError> {
        begin.validate()?;
        if begin.model_fingerprint != expect_fingerprint {
            return Err(WireError::Malformed {
                what: "StateBegin.model_fingerprint",
                detail: format!(
                    "a state of model {:016x}, this node runs {expect_fingerprint:016x}",
                    begin.model_fingerprint
                ),
            });
        }
        for (what, value, max) in [
            ("StateBegin.position", begin.position, limits.max_position),
            (
                "StateBegin.layers.count",
                begin.layers.len() as u64,
                limits.max_layers.into(),
            ),
            (
                "StateBegin.state_bytes",
                begin.state_bytes(),
                limits.max_state_bytes,
            ),
        ] {
            if value > max {
                return Err(WireError::OverLimit { what, value, max });
            }
        }
        // Placeholders of the right kind; attention layers fill theirs as blocks arrive.
        let layers = begin
            .layers
            .iter()
            .map(|shape| match shape {
                super::LayerShape::DeltaNet { .. } => LayerImage::DeltaNet {
                    conv: Vec::new(),
                    recurrent: Vec::new(),
                },
                super::LayerShape::Attention { .. } => LayerImage::Attention { blocks: Vec::new() },
            })
            .collect();
        let progress = Progress::new(Plan::from(&begin));
        Ok(Assembler {
            begin,
            layers,
            progress,
        })
    }

    /// The header of the transfer.
    pub fn begin(&self) -> &StateBegin {
        &self.begin
    }

    /// How many layers (from 0) are complete: a decode node may start loading those while
    /// later ones still arrive.
    pub fn layers_complete(&self) -> usize {
        self.progress.complete()
    }

    /// Takes the next chunk: checked against the header ([`StateChunk::check_against`]) and
    /// the chunks before it (layers in order, blocks contiguous).
    pub fn push(&mut self, chunk: StateChunk) -> Result<(), WireError> {
        let plan = Plan::from(&self.begin);
        self.progress.check(plan, &chunk)?;
        self.progress.record(plan, &chunk);
        match (chunk.body, self.layers.get_mut(chunk.layer as usize)) {
            (ChunkBody::DeltaNet { conv, recurrent }, Some(layer)) => {
                *layer = LayerImage::DeltaNet { conv, recurrent };
            }
            // Grown as blocks arrive, not reserved for the whole layer up front: the header
            // alone must not make the receiver allocate (a block's `KvBlock` costs more than
            // its 8 bytes of scales on the wire).
            (ChunkBody::Attention { blocks, .. }, Some(LayerImage::Attention { blocks: have })) => {
                have.extend(blocks);
            }
            // `check` matched the chunk to the layer's kind, and the placeholders have it.
            _ => {}
        }
        Ok(())
    }

    /// Ends the transfer: `end` must name it and match the chunks that arrived (count and
    /// checksum), and every layer must be complete.
    pub fn finish(self, end: StateEnd) -> Result<SequenceStateImage, WireError> {
        self.progress.check_end(Plan::from(&self.begin), &end)?;
        Ok(SequenceStateImage {
            begin: self.begin,
            layers: self.layers,
        })
    }
}
