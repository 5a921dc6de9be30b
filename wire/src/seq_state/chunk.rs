//! The frames that carry a state's data ([`StateChunk`]) and close a transfer ([`StateEnd`]):
//! their encoding and the checks a chunk passes on its own, without the header (sizes against
//! [`Limits`] and the payload, finite values, scales).
//!
//! A chunk encodes through a [`Sink`], so that the checksum of a chunk is taken from the same
//! bytes the frame carries without encoding it into a buffer first.

use crate::WireError;
use crate::codec::{Put, Reader};
use crate::frame::FrameKind;
use crate::limits::Limits;
use crate::messages::{Message, reader};

use super::begin::{KvDtype, decode_dtype};
use super::checksum::Checksum;
use super::{KIND_ATTENTION, KIND_DELTANET};

/// Payload bytes of a DeltaNet chunk besides its values: transfer id, layer, kind, two counts.
pub(super) const DELTANET_CHUNK_BYTES: u64 = 8 + 4 + 1 + 4 + 4;
/// Payload bytes of an attention chunk besides its blocks: transfer id, layer, kind,
/// first block, three dimensions, dtype, block count.
pub(super) const ATTENTION_CHUNK_BYTES: u64 = 8 + 4 + 1 + 8 + 3 * 4 + 1 + 4;
/// A KV block's key and value scale.
pub(super) const SCALE_BYTES: u64 = 8;

/// Part of one layer of a sequence state; see [`super`] for the layout.
#[derive(Clone, Debug, PartialEq)]
pub struct StateChunk {
    /// The [`super::StateBegin::transfer_id`] of the transfer it belongs to.
    pub transfer_id: u64,
    pub layer: u32,
    pub body: ChunkBody,
}

/// What a [`StateChunk`] carries.
#[derive(Clone, Debug, PartialEq)]
pub enum ChunkBody {
    /// A DeltaNet layer's whole state: conv `[conv_rows, conv_dim]` and recurrent
    /// `[v_heads, k_head_dim, v_head_dim]`, row-major, every value finite.
    DeltaNet { conv: Vec<f32>, recurrent: Vec<f32> },
    /// A run of an attention layer's KV blocks, `first_block ..` without gaps. The block shape
    /// is repeated so that the chunk decodes without the header.
    Attention {
        first_block: u64,
        block_tokens: u32,
        kv_heads: u32,
        head_dim: u32,
        dtype: KvDtype,
        blocks: Vec<KvBlock>,
    },
}

/// One paged KV block.
#[derive(Clone, Debug, PartialEq)]
pub struct KvBlock {
    /// Finite; exactly 1.0 unless the dtype is fp8.
    pub key_scale: f32,
    pub value_scale: f32,
    /// Keys `[block_tokens, kv_heads, head_dim]` then values of the same shape, raw
    /// little-endian elements: `2 × block_tokens × kv_heads × head_dim × dtype.size()` bytes.
    pub data: Vec<u8>,
}

/// Closes a state transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateEnd {
    pub transfer_id: u64,
    /// How many [`StateChunk`] frames were sent.
    pub chunks: u32,
    /// [`Checksum`] of every chunk payload, in the order sent.
    pub checksum: u64,
}

/// Where a chunk's payload bytes go: a buffer, or straight into a checksum.
pub(super) trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Sink for Checksum {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

/// Appends `values` as little-endian f32s, a few at a time (one call per value would make
/// the checksum path slow).
fn put_f32s(sink: &mut impl Sink, values: &[f32]) {
    let mut buf = [0u8; 256];
    for group in values.chunks(64) {
        for (dst, v) in buf.chunks_exact_mut(4).zip(group) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        sink.put(buf.get(..group.len() * 4).unwrap_or_default());
    }
}

/// A count on the wire; one over `u32::MAX` saturates, so the peer rejects the payload rather
/// than misreading it.
fn count(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes()
}

impl StateChunk {
    /// Writes the payload to `sink`.
    pub(super) fn write(&self, sink: &mut impl Sink) {
        sink.put(&self.transfer_id.to_le_bytes());
        sink.put(&self.layer.to_le_bytes());
        match &self.body {
            ChunkBody::DeltaNet { conv, recurrent } => {
                sink.put(&[KIND_DELTANET]);
                sink.put(&count(conv.len()));
                put_f32s(sink, conv);
                sink.put(&count(recurrent.len()));
                put_f32s(sink, recurrent);
            }
            ChunkBody::Attention {
                first_block,
                block_tokens,
                kv_heads,
                head_dim,
                dtype,
                blocks,
            } => {
                sink.put(&[KIND_ATTENTION]);
                sink.put(&first_block.to_le_bytes());
                sink.put(&block_tokens.to_le_bytes());
                sink.put(&kv_heads.to_le_bytes());
                sink.put(&head_dim.to_le_bytes());
                sink.put(&[dtype.to_u8()]);
                sink.put(&count(blocks.len()));
                for b in blocks {
                    sink.put(&b.key_scale.to_le_bytes());
                    sink.put(&b.value_scale.to_le_bytes());
                    sink.put(&b.data);
                }
            }
        }
    }

    /// Bytes of the encoded payload.
    pub fn payload_len(&self) -> usize {
        match &self.body {
            ChunkBody::DeltaNet { conv, recurrent } => {
                DELTANET_CHUNK_BYTES as usize + 4 * (conv.len() + recurrent.len())
            }
            ChunkBody::Attention { blocks, .. } => {
                blocks.iter().fold(ATTENTION_CHUNK_BYTES as usize, |n, b| {
                    n + SCALE_BYTES as usize + b.data.len()
                })
            }
        }
    }
}

/// Checks that every value of a DeltaNet state is finite: a NaN or infinity means the state
/// has diverged, and moving it would only spread it (it would also make two equal states
/// compare unequal).
pub(super) fn check_finite(
    values: &[f32],
    what: &'static str,
    layer: u32,
) -> Result<(), WireError> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(WireError::Malformed {
            what,
            detail: format!("layer {layer}: value {i} is {}, not finite", values[i]),
        }),
    }
}

/// Checks a block's scales: finite, and exactly 1.0 for the unscaled dtypes (so that a block
/// has one encoding).
pub(super) fn check_scales(
    block: &KvBlock,
    dtype: KvDtype,
    layer: u32,
    index: u64,
) -> Result<(), WireError> {
    for (what, s) in [
        ("StateChunk.key_scale", block.key_scale),
        ("StateChunk.value_scale", block.value_scale),
    ] {
        let bad = !s.is_finite() || (!dtype.is_scaled() && s != 1.0);
        if bad {
            let want = if dtype.is_scaled() { "finite" } else { "1.0" };
            return Err(WireError::Malformed {
                what,
                detail: format!("layer {layer}, block {index}: {s}, must be {want} for {dtype:?}"),
            });
        }
    }
    Ok(())
}

/// Bytes of a block's data for these dimensions, or `None` on overflow.
pub(super) fn block_data_bytes(
    block_tokens: u32,
    kv_heads: u32,
    head_dim: u32,
    dtype: KvDtype,
) -> Option<u64> {
    (2 * u64::from(block_tokens))
        .checked_mul(kv_heads.into())?
        .checked_mul(head_dim.into())?
        .checked_mul(dtype.size() as u64)
}

/// A dimension of an attention chunk: 1 to `max_state_dim`.
fn dim(r: &mut Reader<'_>, what: &'static str, limits: &Limits) -> Result<u32, WireError> {
    let v = r.u32_max(what, limits.max_state_dim)?;
    if v == 0 {
        return Err(WireError::Malformed {
            what,
            detail: "0, must be at least 1".into(),
        });
    }
    Ok(v)
}

/// A count of f32s and the values, checked against the bytes left before allocating.
fn f32s(
    r: &mut Reader<'_>,
    count_what: &'static str,
    what: &'static str,
    layer: u32,
) -> Result<Vec<f32>, WireError> {
    // The payload is at most `max_frame` bytes, so the bytes left bound the count by both.
    let n = r.u32(count_what)?;
    let bytes = r.bytes(u64::from(n) * 4, what)?;
    let values: Vec<f32> = bytes
        .as_chunks::<4>()
        .0
        .iter()
        .map(|b| f32::from_le_bytes(*b))
        .collect();
    check_finite(&values, what, layer)?;
    Ok(values)
}

fn decode_attention(
    r: &mut Reader<'_>,
    layer: u32,
    limits: &Limits,
) -> Result<ChunkBody, WireError> {
    let first_block = r.u64("StateChunk.first_block")?;
    let block_tokens = dim(r, "StateChunk.block_tokens", limits)?;
    let kv_heads = dim(r, "StateChunk.kv_heads", limits)?;
    let head_dim = dim(r, "StateChunk.head_dim", limits)?;
    let dtype = decode_dtype(r, "StateChunk.dtype")?;
    let count = r.u32("StateChunk.blocks.count")?;
    // Every block holds at least one token.
    let end = first_block.saturating_add(count.into());
    if end > limits.max_state_tokens {
        return Err(WireError::OverLimit {
            what: "StateChunk.first_block + count",
            value: end,
            max: limits.max_state_tokens,
        });
    }
    let data_bytes =
        block_data_bytes(block_tokens, kv_heads, head_dim, dtype).ok_or_else(|| {
            WireError::Malformed {
                what: "StateChunk.data",
                detail: format!(
                    "2 × {block_tokens} × {kv_heads} × {head_dim} × {} bytes overflows",
                    dtype.size()
                ),
            }
        })?;
    // Saturating: a product beyond u64 is beyond any payload too.
    let needed = u64::from(count).saturating_mul(data_bytes.saturating_add(SCALE_BYTES));
    r.require(needed, "StateChunk.blocks")?;
    let mut blocks = Vec::with_capacity(count as usize);
    for i in 0..u64::from(count) {
        let block = KvBlock {
            key_scale: r.f32("StateChunk.key_scale")?,
            value_scale: r.f32("StateChunk.value_scale")?,
            data: r.bytes(data_bytes, "StateChunk.data")?.to_vec(),
        };
        check_scales(&block, dtype, layer, first_block.saturating_add(i))?;
        blocks.push(block);
    }
    Ok(ChunkBody::Attention {
        first_block,
        block_tokens,
        kv_heads,
        head_dim,
        dtype,
        blocks,
    })
}

impl Message for StateChunk {
    const KIND: FrameKind = FrameKind::StateChunk;

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.payload_len());
        self.write(out);
    }

    fn decode(payload: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let mut r = reader(payload, limits)?;
        let transfer_id = r.u64("StateChunk.transfer_id")?;
        let layer = r.u32("StateChunk.layer")?;
        if layer >= limits.max_layers {
            return Err(WireError::OverLimit {
                what: "StateChunk.layer",
                value: layer.into(),
                max: limits.max_layers.saturating_sub(1).into(),
            });
        }
        let body = match r.u8("StateChunk.kind")? {
            KIND_DELTANET => ChunkBody::DeltaNet {
                conv: f32s(&mut r, "StateChunk.conv.count", "StateChunk.conv", layer)?,
                recurrent: f32s(
                    &mut r,
                    "StateChunk.recurrent.count",
                    "StateChunk.recurrent",
                    layer,
                )?,
            },
            KIND_ATTENTION => decode_attention(&mut r, layer, limits)?,
            k => {
                return Err(WireError::Malformed {
                    what: "StateChunk.kind",
                    detail: format!("unknown layer kind {k}"),
                });
            }
        };
        r.finish("StateChunk")?;
        Ok(StateChunk {
            transfer_id,
            layer,
            body,
        })
    }
}

impl Message for StateEnd {
    const KIND: FrameKind = FrameKind::StateEnd;

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.put_u64(self.transfer_id);
        out.put_u32(self.chunks);
        out.put_u64(self.checksum);
    }

    fn decode(payload: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let mut r = reader(payload, limits)?;
        let transfer_id = r.u64("StateEnd.transfer_id")?;
        let chunks = r.u32("StateEnd.chunks")?;
        let checksum = r.u64("StateEnd.checksum")?;
        r.finish("StateEnd")?;
        Ok(StateEnd {
            transfer_id,
            chunks,
            checksum,
        })
    }
}
