//! Chunks against the header: [`StateChunk::check_against`] (what a chunk must be on its own:
//! the right transfer, a layer of the state, the layer's kind and exact sizes) and
//! [`Progress`] (what it must be next: layers in order, blocks contiguous, the chunk count and
//! checksum). Both ends run the same code, so a sender cannot write what the receiver refuses.

use crate::WireError;

use super::begin::{LayerShape, StateBegin};
use super::checksum::Checksum;
use super::chunk::{ChunkBody, KvBlock, StateChunk, StateEnd, check_finite, check_scales};

/// What the checks need of a header (a sender keeps only this, not the tokens).
#[derive(Clone, Copy, Debug)]
pub(super) struct Plan<'a> {
    pub transfer_id: u64,
    pub position: u64,
    pub layers: &'a [LayerShape],
}

impl<'a> From<&'a StateBegin> for Plan<'a> {
    fn from(b: &'a StateBegin) -> Self {
        Plan {
            transfer_id: b.transfer_id,
            position: b.position,
            layers: &b.layers,
        }
    }
}

impl StateChunk {
    /// Checks this chunk against the header of its transfer, as far as that is possible
    /// without knowing the chunks before it: the transfer id, the layer (in range, of the
    /// chunk's kind), the exact sizes for the layer's shape (conv and recurrent element
    /// counts; block dimensions and dtype equal to the header's, every block's data size and
    /// scales), blocks within `begin.blocks_for_layer(layer)`, and zeros in the unused slots
    /// of the layer's last block. [`super::Assembler::push`] adds the order.
    pub fn check_against(&self, begin: &StateBegin) -> Result<(), WireError> {
        check_chunk(Plan::from(begin), self)
    }
}

fn malformed(what: &'static str, detail: String) -> WireError {
    WireError::Malformed { what, detail }
}

pub(super) fn check_chunk(plan: Plan<'_>, chunk: &StateChunk) -> Result<(), WireError> {
    let l = chunk.layer;
    if chunk.transfer_id != plan.transfer_id {
        return Err(malformed(
            "StateChunk.transfer_id",
            format!(
                "a chunk of transfer {} in transfer {}",
                chunk.transfer_id, plan.transfer_id
            ),
        ));
    }
    let Some(shape) = usize::try_from(l).ok().and_then(|i| plan.layers.get(i)) else {
        return Err(malformed(
            "StateChunk.layer",
            format!("layer {l}, but the state has {} layers", plan.layers.len()),
        ));
    };
    match (*shape, &chunk.body) {
        (
            LayerShape::DeltaNet {
                conv_rows,
                conv_dim,
                v_heads,
                k_head_dim,
                v_head_dim,
            },
            ChunkBody::DeltaNet { conv, recurrent },
        ) => {
            for (what, got, want, dims) in [
                (
                    "StateChunk.conv",
                    conv.len(),
                    shape.conv_len(),
                    format!("[{conv_rows}, {conv_dim}]"),
                ),
                (
                    "StateChunk.recurrent",
                    recurrent.len(),
                    shape.recurrent_len(),
                    format!("[{v_heads}, {k_head_dim}, {v_head_dim}]"),
                ),
            ] {
                if got as u64 != want {
                    return Err(malformed(
                        what,
                        format!("layer {l}: {got} values, the layer's state {dims} has {want}"),
                    ));
                }
            }
            check_finite(conv, "StateChunk.conv", l)?;
            check_finite(recurrent, "StateChunk.recurrent", l)
        }
        (
            LayerShape::Attention {
                kv_heads,
                head_dim,
                block_tokens,
                dtype,
            },
            ChunkBody::Attention {
                first_block,
                block_tokens: c_block_tokens,
                kv_heads: c_kv_heads,
                head_dim: c_head_dim,
                dtype: c_dtype,
                blocks,
            },
        ) => {
            for (what, got, want) in [
                ("StateChunk.block_tokens", *c_block_tokens, block_tokens),
                ("StateChunk.kv_heads", *c_kv_heads, kv_heads),
                ("StateChunk.head_dim", *c_head_dim, head_dim),
            ] {
                if got != want {
                    return Err(malformed(
                        what,
                        format!("layer {l}: {got}, the header says {want}"),
                    ));
                }
            }
            if *c_dtype != dtype {
                return Err(malformed(
                    "StateChunk.dtype",
                    format!("layer {l}: {c_dtype:?}, the header says {dtype:?}"),
                ));
            }
            check_blocks(plan.position, shape, l, *first_block, blocks)
        }
        (LayerShape::DeltaNet { .. }, ChunkBody::Attention { .. }) => Err(malformed(
            "StateChunk.kind",
            format!("layer {l} is a DeltaNet layer, the chunk carries KV blocks"),
        )),
        (LayerShape::Attention { .. }, ChunkBody::DeltaNet { .. }) => Err(malformed(
            "StateChunk.kind",
            format!("layer {l} is an attention layer, the chunk carries a DeltaNet state"),
        )),
    }
}

/// The blocks of an attention chunk whose dimensions match `shape`.
fn check_blocks(
    position: u64,
    shape: &LayerShape,
    l: u32,
    first: u64,
    blocks: &[KvBlock],
) -> Result<(), WireError> {
    let LayerShape::Attention {
        block_tokens,
        dtype,
        ..
    } = *shape
    else {
        return Ok(());
    };
    let need = shape.blocks_for(position);
    let end = first.saturating_add(blocks.len() as u64);
    if blocks.is_empty() {
        return Err(malformed(
            "StateChunk.blocks",
            format!("layer {l}: a chunk of no blocks"),
        ));
    }
    if end > need {
        return Err(malformed(
            "StateChunk.blocks",
            format!(
                "layer {l}: blocks {first}..{end}, but {position} tokens fill {need} blocks of {block_tokens}"
            ),
        ));
    }
    let data_bytes = shape.block_data_bytes();
    for (i, b) in (first..).zip(blocks) {
        if b.data.len() as u64 != data_bytes {
            return Err(malformed(
                "StateChunk.data",
                format!(
                    "layer {l}, block {i}: {} bytes, a block of this layer has {data_bytes}",
                    b.data.len()
                ),
            ));
        }
        check_scales(b, dtype, l, i)?;
    }
    // The last block's unused token slots: zeros, so that a state has one encoding.
    if end == need
        && let Some(last) = blocks.last()
    {
        let used = position - (need - 1) * u64::from(block_tokens);
        let token_bytes = data_bytes / (2 * u64::from(block_tokens));
        let half = data_bytes / 2;
        let unused = |from: u64, to: u64| {
            let range = usize::try_from(from).ok()?..usize::try_from(to).ok()?;
            last.data.get(range)
        };
        let keys = unused(used * token_bytes, half);
        let values = unused(half + used * token_bytes, data_bytes);
        let zero = |s: Option<&[u8]>| s.is_some_and(|s| s.iter().all(|b| *b == 0));
        if !zero(keys) || !zero(values) {
            return Err(malformed(
                "StateChunk.data",
                format!(
                    "layer {l}, block {}: its {} unused token slots (of {block_tokens}) are not zero",
                    need - 1,
                    u64::from(block_tokens) - used
                ),
            ));
        }
    }
    Ok(())
}

/// How far a transfer has got. Layers complete in order; an attention layer that `position`
/// fills with no blocks needs no chunk and is complete from the start.
#[derive(Clone, Debug)]
pub(super) struct Progress {
    /// The first layer not yet complete (`layers.len()` once all are).
    layer: usize,
    /// The next block of `layer`, if it is an attention layer.
    next_block: u64,
    chunks: u32,
    checksum: Checksum,
}

impl Progress {
    pub fn new(plan: Plan<'_>) -> Self {
        let mut p = Progress {
            layer: 0,
            next_block: 0,
            chunks: 0,
            checksum: Checksum::new(),
        };
        p.skip_empty(plan);
        p
    }

    /// Layers complete so far (all of them before `complete()` is the layer count).
    pub fn complete(&self) -> usize {
        self.layer
    }

    fn skip_empty(&mut self, plan: Plan<'_>) {
        while let Some(shape) = plan.layers.get(self.layer)
            && matches!(shape, LayerShape::Attention { .. })
            && shape.blocks_for(plan.position) == 0
        {
            self.layer += 1;
        }
    }

    /// Checks that `chunk` is a valid next chunk of the transfer; changes nothing.
    pub fn check(&self, plan: Plan<'_>, chunk: &StateChunk) -> Result<(), WireError> {
        check_chunk(plan, chunk)?;
        let l = chunk.layer;
        let current = self.layer;
        if (l as usize) < current {
            return Err(malformed(
                "StateChunk.layer",
                format!("layer {l} is already complete (layers arrive in order)"),
            ));
        }
        if l as usize > current {
            return Err(malformed(
                "StateChunk.layer",
                format!(
                    "layer {l} arrives before layer {current} is complete (layers arrive in order)"
                ),
            ));
        }
        if let ChunkBody::Attention { first_block, .. } = chunk.body {
            let next = self.next_block;
            if first_block > next {
                let after = match next {
                    0 => "first".to_owned(),
                    n => format!("after block {}", n - 1),
                };
                return Err(malformed(
                    "StateChunk.first_block",
                    format!("layer {l}: block {first_block} arrives {after} (expected {next})"),
                ));
            }
            if first_block < next {
                return Err(malformed(
                    "StateChunk.first_block",
                    format!(
                        "layer {l}: block {first_block} arrives again (blocks up to {} are in; expected {next})",
                        next - 1
                    ),
                ));
            }
        }
        if self.chunks == u32::MAX {
            return Err(WireError::OverLimit {
                what: "StateChunk count",
                value: u64::from(u32::MAX) + 1,
                max: u32::MAX.into(),
            });
        }
        Ok(())
    }

    /// Records a chunk that [`Progress::check`] accepted.
    pub fn record(&mut self, plan: Plan<'_>, chunk: &StateChunk) {
        self.chunks = self.chunks.saturating_add(1);
        self.checksum.add_chunk(chunk);
        let done = match &chunk.body {
            ChunkBody::DeltaNet { .. } => true,
            ChunkBody::Attention {
                first_block,
                blocks,
                ..
            } => {
                self.next_block = first_block.saturating_add(blocks.len() as u64);
                self.next_block
                    >= plan
                        .layers
                        .get(self.layer)
                        .map_or(0, |s| s.blocks_for(plan.position))
            }
        };
        if done {
            self.layer += 1;
            self.next_block = 0;
            self.skip_empty(plan);
        }
    }

    /// The [`StateEnd`] this progress calls for (whether or not the transfer is complete).
    pub fn end(&self, plan: Plan<'_>) -> StateEnd {
        StateEnd {
            transfer_id: plan.transfer_id,
            chunks: self.chunks,
            checksum: self.checksum.finish(),
        }
    }

    /// Checks the sender's `end` against what arrived, then that every layer is complete.
    pub fn check_end(&self, plan: Plan<'_>, end: &StateEnd) -> Result<(), WireError> {
        let got = self.end(plan);
        if end.transfer_id != plan.transfer_id {
            return Err(malformed(
                "StateEnd.transfer_id",
                format!(
                    "the end of transfer {} in transfer {}",
                    end.transfer_id, plan.transfer_id
                ),
            ));
        }
        if end.chunks != got.chunks {
            return Err(malformed(
                "StateEnd.chunks",
                format!("{} chunks sent, {} arrived", end.chunks, got.chunks),
            ));
        }
        if end.checksum != got.checksum {
            return Err(malformed(
                "StateEnd.checksum",
                format!(
                    "{:016x} sent, {:016x} over the chunks that arrived",
                    end.checksum, got.checksum
                ),
            ));
        }
        self.check_complete(plan)
    }

    /// Fails unless every layer is complete, naming the first that is not.
    pub fn check_complete(&self, plan: Plan<'_>) -> Result<(), WireError> {
        let Some(shape) = plan.layers.get(self.layer) else {
            return Ok(());
        };
        let l = self.layer;
        let n = plan.layers.len();
        let detail = match shape {
            LayerShape::DeltaNet { .. } => {
                format!("layer {l} (of {n}) is missing: its DeltaNet state never arrived")
            }
            LayerShape::Attention { .. } => format!(
                "layer {l} (of {n}) is incomplete: {} of its {} KV blocks arrived",
                self.next_block,
                shape.blocks_for(plan.position)
            ),
        };
        Err(malformed("StateEnd", detail))
    }
}
