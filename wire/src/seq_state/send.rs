//! The sending side of a state transfer: [`layer_chunks`] splits one layer into chunks,
//! [`ChunkWriter`] turns a layer at a time into frames (checked as the receiver will check
//! them, counted and checksummed), and [`SequenceStateImage::to_frames`] does a whole state.

use crate::WireError;
use crate::messages::Message;

use super::assemble::{LayerImage, SequenceStateImage};
use super::begin::{LayerShape, StateBegin};
use super::check::{Plan, Progress};
use super::chunk::{ATTENTION_CHUNK_BYTES, ChunkBody, SCALE_BYTES, StateChunk, StateEnd};

/// The chunks of layer `layer`: a DeltaNet layer is one chunk however large; an attention
/// layer's blocks are split into runs whose payloads stay within `max_chunk_bytes`, but at
/// least one block each (none for a layer of no blocks). Fails if the image is not of the
/// shape's kind; its sizes are checked by [`ChunkWriter`] or the receiver.
pub fn layer_chunks(
    transfer_id: u64,
    layer: u32,
    image: &LayerImage,
    shape: &LayerShape,
    max_chunk_bytes: usize,
) -> Result<Vec<StateChunk>, WireError> {
    let chunk = |body| StateChunk {
        transfer_id,
        layer,
        body,
    };
    match (image, *shape) {
        (LayerImage::DeltaNet { conv, recurrent }, LayerShape::DeltaNet { .. }) => {
            Ok(vec![chunk(ChunkBody::DeltaNet {
                conv: conv.clone(),
                recurrent: recurrent.clone(),
            })])
        }
        (
            LayerImage::Attention { blocks },
            LayerShape::Attention {
                kv_heads,
                head_dim,
                block_tokens,
                dtype,
            },
        ) => {
            let per_block = shape.block_data_bytes().saturating_add(SCALE_BYTES);
            let room = (max_chunk_bytes as u64).saturating_sub(ATTENTION_CHUNK_BYTES);
            let run = usize::try_from(room / per_block)
                .unwrap_or(usize::MAX)
                .max(1);
            Ok((0u64..)
                .step_by(run)
                .zip(blocks.chunks(run))
                .map(|(first_block, run)| {
                    chunk(ChunkBody::Attention {
                        first_block,
                        block_tokens,
                        kv_heads,
                        head_dim,
                        dtype,
                        blocks: run.to_vec(),
                    })
                })
                .collect())
        }
        (LayerImage::DeltaNet { .. }, LayerShape::Attention { .. }) => Err(WireError::Malformed {
            what: "LayerImage",
            detail: format!("layer {layer}: a DeltaNet state for an attention layer"),
        }),
        (LayerImage::Attention { .. }, LayerShape::DeltaNet { .. }) => Err(WireError::Malformed {
            what: "LayerImage",
            detail: format!("layer {layer}: KV blocks for a DeltaNet layer"),
        }),
    }
}

/// Writes the chunk frames of one transfer, a layer at a time, so that a sender can stream
/// layer `l` while it computes later ones. Every chunk is checked exactly as the receiver's
/// [`super::Assembler`] will check it, and counted and checksummed for the [`StateEnd`].
///
/// ```text
/// send(begin.to_frame()?);
/// let mut w = ChunkWriter::new(&begin)?;
/// for each layer l, in order, once computed: for f in w.layer_frames(l, &image, max)? { send(f) }
/// send(w.end()?.to_frame()?);
/// ```
#[derive(Debug)]
pub struct ChunkWriter {
    transfer_id: u64,
    position: u64,
    layers: Vec<LayerShape>,
    progress: Progress,
}

impl ChunkWriter {
    /// Starts writing the chunks of the transfer `begin` opens (which must pass
    /// [`StateBegin::validate`]).
    pub fn new(begin: &StateBegin) -> Result<Self, WireError> {
        begin.validate()?;
        let layers = begin.layers.clone();
        let progress = Progress::new(Plan::from(begin));
        Ok(ChunkWriter {
            transfer_id: begin.transfer_id,
            position: begin.position,
            layers,
            progress,
        })
    }

    fn plan(&self) -> Plan<'_> {
        Plan {
            transfer_id: self.transfer_id,
            position: self.position,
            layers: &self.layers,
        }
    }

    /// Checks and records the next chunk, returning its frame.
    pub fn chunk_frame(&mut self, chunk: &StateChunk) -> Result<Vec<u8>, WireError> {
        // Built from the fields (not `self.plan()`) so that `progress` can be borrowed apart.
        let plan = Plan {
            transfer_id: self.transfer_id,
            position: self.position,
            layers: &self.layers,
        };
        self.progress.check(plan, chunk)?;
        let frame = chunk.to_frame()?;
        self.progress.record(plan, chunk);
        Ok(frame)
    }

    /// The frames of layer `layer` (the next incomplete one), split by [`layer_chunks`]; fails
    /// unless they complete the layer.
    pub fn layer_frames(
        &mut self,
        layer: u32,
        image: &LayerImage,
        max_chunk_bytes: usize,
    ) -> Result<Vec<Vec<u8>>, WireError> {
        let Some(shape) = usize::try_from(layer)
            .ok()
            .and_then(|l| self.layers.get(l))
            .copied()
        else {
            return Err(WireError::Malformed {
                what: "StateChunk.layer",
                detail: format!(
                    "layer {layer}, but the state has {} layers",
                    self.layers.len()
                ),
            });
        };
        let chunks = layer_chunks(self.transfer_id, layer, image, &shape, max_chunk_bytes)?;
        let frames = chunks
            .iter()
            .map(|c| self.chunk_frame(c))
            .collect::<Result<Vec<_>, _>>()?;
        // Only a short attention image (too few blocks) gets here without completing its
        // layer: every chunk passed the checks.
        if self.progress.complete() <= layer as usize {
            let blocks = match image {
                LayerImage::Attention { blocks } => blocks.len(),
                LayerImage::DeltaNet { .. } => 0,
            };
            return Err(WireError::Malformed {
                what: "LayerImage",
                detail: format!(
                    "layer {layer}: {blocks} KV blocks, but {} tokens fill {}",
                    self.position,
                    shape.blocks_for(self.position)
                ),
            });
        }
        Ok(frames)
    }

    /// The closing frame's message; fails unless every layer was written.
    pub fn end(&self) -> Result<StateEnd, WireError> {
        self.progress.check_complete(self.plan())?;
        Ok(self.progress.end(self.plan()))
    }
}

impl SequenceStateImage {
    /// The whole transfer as encoded frames: the begin (with `transfer_id`), every layer's
    /// chunks in order ([`ChunkWriter::layer_frames`]) and the end. Fails if the image is
    /// inconsistent (the receiver would refuse it) or a frame exceeds 4 GiB.
    pub fn to_frames(
        &self,
        transfer_id: u64,
        max_chunk_bytes: usize,
    ) -> Result<Vec<Vec<u8>>, WireError> {
        let begin = StateBegin {
            transfer_id,
            ..self.begin.clone()
        };
        if self.layers.len() != begin.layers.len() {
            return Err(WireError::Malformed {
                what: "SequenceStateImage.layers",
                detail: format!(
                    "{} layer images for a header of {} layers",
                    self.layers.len(),
                    begin.layers.len()
                ),
            });
        }
        let mut writer = ChunkWriter::new(&begin)?;
        let mut frames = vec![begin.to_frame()?];
        for (l, image) in self.layers.iter().enumerate() {
            let l = u32::try_from(l).unwrap_or(u32::MAX);
            frames.extend(writer.layer_frames(l, image, max_chunk_bytes)?);
        }
        frames.push(writer.end()?.to_frame()?);
        Ok(frames)
    }
}
