//! The header of a state transfer ([`StateBegin`]) and the layer shapes it announces
//! ([`LayerShape`], [`KvDtype`]): the sizes every chunk is later measured against, and the
//! arithmetic that turns them into bytes without overflowing on hostile values.

use crate::WireError;
use crate::codec::{Put, Reader};
use crate::frame::FrameKind;
use crate::limits::Limits;
use crate::messages::{Message, reader};

use super::chunk::{ATTENTION_CHUNK_BYTES, DELTANET_CHUNK_BYTES, SCALE_BYTES};
use super::{KIND_ATTENTION, KIND_DELTANET};

/// The version of the state format, carried by every [`StateBegin`] and checked before
/// anything else is read; versioned apart from the protocol because stored states outlive
/// the connections (and builds) that wrote them.
pub const STATE_FORMAT_VERSION: u16 = 1;

/// The element type of a KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvDtype {
    F32,
    Bf16,
    /// OCP FP8 E4M3, dequantised with the block's key or value scale.
    Fp8E4M3,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
            KvDtype::Fp8E4M3 => 1,
        }
    }

    /// The stable code on the wire (0 and 1 as [`crate::TensorDtype`]).
    pub fn to_u8(self) -> u8 {
        match self {
            KvDtype::F32 => 0,
            KvDtype::Bf16 => 1,
            KvDtype::Fp8E4M3 => 2,
        }
    }

    pub fn from_u8(v: u8) -> Option<KvDtype> {
        match v {
            0 => Some(KvDtype::F32),
            1 => Some(KvDtype::Bf16),
            2 => Some(KvDtype::Fp8E4M3),
            _ => None,
        }
    }

    /// Whether blocks of this dtype carry real scales; the others' are exactly 1.0.
    pub fn is_scaled(self) -> bool {
        self == KvDtype::Fp8E4M3
    }
}

/// What one layer's state looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerShape {
    /// A Gated DeltaNet layer: conv state `[conv_rows, conv_dim]` and recurrent state
    /// `[v_heads, k_head_dim, v_head_dim]`, both f32.
    DeltaNet {
        conv_rows: u32,
        conv_dim: u32,
        v_heads: u32,
        k_head_dim: u32,
        v_head_dim: u32,
    },
    /// A full-attention layer's paged KV cache: blocks of `block_tokens` tokens, each keys
    /// `[block_tokens, kv_heads, head_dim]` then values of the same shape, in `dtype`.
    Attention {
        kv_heads: u32,
        head_dim: u32,
        block_tokens: u32,
        dtype: KvDtype,
    },
}

impl LayerShape {
    /// f32 elements of a DeltaNet conv state (0 for attention layers).
    pub fn conv_len(&self) -> u64 {
        match *self {
            LayerShape::DeltaNet {
                conv_rows,
                conv_dim,
                ..
            } => u64::from(conv_rows) * u64::from(conv_dim),
            LayerShape::Attention { .. } => 0,
        }
    }

    /// f32 elements of a DeltaNet recurrent state (0 for attention layers); saturates.
    pub fn recurrent_len(&self) -> u64 {
        match *self {
            LayerShape::DeltaNet {
                v_heads,
                k_head_dim,
                v_head_dim,
                ..
            } => (u64::from(v_heads) * u64::from(k_head_dim)).saturating_mul(v_head_dim.into()),
            LayerShape::Attention { .. } => 0,
        }
    }

    /// Bytes of one KV block's keys and values, scales not included (0 for DeltaNet layers);
    /// saturates.
    pub fn block_data_bytes(&self) -> u64 {
        match *self {
            LayerShape::Attention {
                kv_heads,
                head_dim,
                block_tokens,
                dtype,
            } => (2 * u64::from(block_tokens))
                .saturating_mul(kv_heads.into())
                .saturating_mul(head_dim.into())
                .saturating_mul(dtype.size() as u64),
            LayerShape::DeltaNet { .. } => 0,
        }
    }

    /// KV blocks that hold `position` tokens (0 for DeltaNet layers, and for a zero
    /// `block_tokens`, which no checked shape has).
    pub fn blocks_for(&self, position: u64) -> u64 {
        match *self {
            LayerShape::Attention { block_tokens, .. } if block_tokens > 0 => {
                position.div_ceil(block_tokens.into())
            }
            _ => 0,
        }
    }

    /// Bytes of this layer's state at `position`: conv and recurrent f32s, or every block's
    /// data and its two scales. Saturates at `u64::MAX`, which no limit admits.
    pub fn state_bytes(&self, position: u64) -> u64 {
        match self {
            LayerShape::DeltaNet { .. } => self
                .conv_len()
                .saturating_add(self.recurrent_len())
                .saturating_mul(4),
            LayerShape::Attention { .. } => self
                .blocks_for(position)
                .saturating_mul(self.block_data_bytes().saturating_add(SCALE_BYTES)),
        }
    }

    /// Payload bytes of the smallest chunk that can carry this layer: its whole DeltaNet
    /// state, or one KV block. Saturates.
    pub(super) fn smallest_chunk(&self) -> u64 {
        match self {
            LayerShape::DeltaNet { .. } => self.state_bytes(0).saturating_add(DELTANET_CHUNK_BYTES),
            LayerShape::Attention { .. } => self
                .block_data_bytes()
                .saturating_add(SCALE_BYTES + ATTENTION_CHUNK_BYTES),
        }
    }

    /// Checks that the shape's dimensions are at most `max_dim` (and, for attention, at least
    /// 1: a block of no tokens cannot hold a sequence).
    pub(super) fn check(
        &self,
        what: &'static str,
        layer: usize,
        max_dim: u32,
    ) -> Result<(), WireError> {
        let dims: &[(&str, u32)] = match *self {
            LayerShape::DeltaNet {
                conv_rows,
                conv_dim,
                v_heads,
                k_head_dim,
                v_head_dim,
            } => &[
                ("conv_rows", conv_rows),
                ("conv_dim", conv_dim),
                ("v_heads", v_heads),
                ("k_head_dim", k_head_dim),
                ("v_head_dim", v_head_dim),
            ],
            LayerShape::Attention {
                kv_heads,
                head_dim,
                block_tokens,
                ..
            } => &[
                ("kv_heads", kv_heads),
                ("head_dim", head_dim),
                ("block_tokens", block_tokens),
            ],
        };
        let min = u32::from(matches!(self, LayerShape::Attention { .. }));
        for (name, v) in dims {
            if *v < min || *v > max_dim {
                return Err(WireError::Malformed {
                    what,
                    detail: format!("layer {layer}: {name} = {v} is not in {min}..={max_dim}"),
                });
            }
        }
        Ok(())
    }
}

/// Opens the transfer of one sequence's state; see [`super`] for the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateBegin {
    /// The sender's id of this transfer, repeated by its chunks and end.
    pub transfer_id: u64,
    /// [`STATE_FORMAT_VERSION`]; a decoder refuses any other.
    pub state_version: u16,
    /// Opaque; the receiver compares it to its own model's (`ModelConfig::fingerprint`).
    pub model_fingerprint: u64,
    /// Tokens the state covers.
    pub position: u64,
    /// The token ids covered, `tokens.len() == position`.
    pub tokens: Vec<u32>,
    /// The sampler's RNG state.
    pub rng: [u64; 4],
    /// How many of the trailing `tokens` were generated rather than prompt (≤ position).
    pub generated: u32,
    pub layers: Vec<LayerShape>,
}

impl StateBegin {
    /// Bytes of the whole state this header announces (the sum of
    /// [`LayerShape::state_bytes`]); saturates at `u64::MAX`.
    pub fn state_bytes(&self) -> u64 {
        self.layers.iter().fold(0u64, |sum, l| {
            sum.saturating_add(l.state_bytes(self.position))
        })
    }

    /// KV blocks of layer `layer`: `ceil(position / block_tokens)` for attention layers, 0 for
    /// DeltaNet layers and layers out of range.
    pub fn blocks_for_layer(&self, layer: u32) -> u64 {
        usize::try_from(layer)
            .ok()
            .and_then(|l| self.layers.get(l))
            .map_or(0, |s| s.blocks_for(self.position))
    }

    /// Checks what a decoder checks of a header that was built in process instead (a store,
    /// a test): the format version, `tokens.len() == position`, `generated ≤ position`, and
    /// attention dimensions of at least 1. Dimension limits are the decoder's [`Limits`].
    pub fn validate(&self) -> Result<(), WireError> {
        check_version(self.state_version)?;
        check_generated(self.generated, self.position)?;
        check_token_count(self.tokens.len() as u64, self.position)?;
        for (l, shape) in self.layers.iter().enumerate() {
            shape.check("StateBegin.layers", l, u32::MAX)?;
        }
        Ok(())
    }
}

fn check_version(v: u16) -> Result<(), WireError> {
    if v != STATE_FORMAT_VERSION {
        return Err(WireError::Malformed {
            what: "StateBegin.state_version",
            detail: format!(
                "state format version {v} is not supported (this node reads version {STATE_FORMAT_VERSION})"
            ),
        });
    }
    Ok(())
}

fn check_generated(generated: u32, position: u64) -> Result<(), WireError> {
    if u64::from(generated) > position {
        return Err(WireError::Malformed {
            what: "StateBegin.generated",
            detail: format!("{generated} generated tokens, but the state covers only {position}"),
        });
    }
    Ok(())
}

fn check_token_count(count: u64, position: u64) -> Result<(), WireError> {
    if count != position {
        return Err(WireError::Malformed {
            what: "StateBegin.tokens",
            detail: format!("{count} token ids for a state of position {position}"),
        });
    }
    Ok(())
}

/// Bytes of a layer shape on the wire: kind, then five u32 (DeltaNet) or three u32 and a
/// dtype byte (attention); the smaller bounds a layer count by the payload.
const MIN_SHAPE_BYTES: u64 = 1 + 3 * 4 + 1;

impl Message for StateBegin {
    const KIND: FrameKind = FrameKind::StateBegin;

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(64 + 4 * self.tokens.len() + 21 * self.layers.len());
        out.put_u16(self.state_version);
        out.put_u64(self.transfer_id);
        out.put_u64(self.model_fingerprint);
        out.put_u64(self.position);
        out.put_u32(self.generated);
        self.rng.iter().for_each(|v| out.put_u64(*v));
        out.put_u64(self.tokens.len() as u64);
        self.tokens.iter().for_each(|t| out.put_u32(*t));
        out.put_u32(u32::try_from(self.layers.len()).unwrap_or(u32::MAX));
        for shape in &self.layers {
            match *shape {
                LayerShape::DeltaNet {
                    conv_rows,
                    conv_dim,
                    v_heads,
                    k_head_dim,
                    v_head_dim,
                } => {
                    out.put_u8(KIND_DELTANET);
                    for v in [conv_rows, conv_dim, v_heads, k_head_dim, v_head_dim] {
                        out.put_u32(v);
                    }
                }
                LayerShape::Attention {
                    kv_heads,
                    head_dim,
                    block_tokens,
                    dtype,
                } => {
                    out.put_u8(KIND_ATTENTION);
                    for v in [kv_heads, head_dim, block_tokens] {
                        out.put_u32(v);
                    }
                    out.put_u8(dtype.to_u8());
                }
            }
        }
    }

    fn decode(payload: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let mut r = reader(payload, limits)?;
        // First, so that a later version may change everything after it.
        let state_version = r.u16("StateBegin.state_version")?;
        check_version(state_version)?;
        let transfer_id = r.u64("StateBegin.transfer_id")?;
        let model_fingerprint = r.u64("StateBegin.model_fingerprint")?;
        let position = r.u64("StateBegin.position")?;
        if position > limits.max_state_tokens {
            return Err(WireError::OverLimit {
                what: "StateBegin.position",
                value: position,
                max: limits.max_state_tokens,
            });
        }
        let generated = r.u32("StateBegin.generated")?;
        check_generated(generated, position)?;
        let mut rng = [0u64; 4];
        for v in &mut rng {
            *v = r.u64("StateBegin.rng")?;
        }
        let count = r.u64("StateBegin.tokens.count")?;
        check_token_count(count, position)?;
        // count ≤ max_state_tokens, so count × 4 cannot overflow.
        let bytes = r.bytes(count * 4, "StateBegin.tokens")?;
        let tokens = bytes
            .as_chunks::<4>()
            .0
            .iter()
            .map(|b| u32::from_le_bytes(*b))
            .collect();
        let count = r.u32_max("StateBegin.layers.count", limits.max_layers)?;
        r.require(u64::from(count) * MIN_SHAPE_BYTES, "StateBegin.layers")?;
        let mut layers = Vec::with_capacity(count as usize);
        for l in 0..count as usize {
            let shape = decode_shape(&mut r)?;
            shape.check("StateBegin.layers", l, limits.max_state_dim)?;
            // A layer no frame can carry could never arrive: refuse the transfer now.
            let smallest = shape.smallest_chunk();
            if smallest > u64::from(limits.max_frame) {
                return Err(WireError::Malformed {
                    what: "StateBegin.layers",
                    detail: format!(
                        "layer {l}: its smallest chunk ({smallest} bytes) exceeds the frame limit of {}",
                        limits.max_frame
                    ),
                });
            }
            layers.push(shape);
        }
        r.finish("StateBegin")?;
        Ok(StateBegin {
            transfer_id,
            state_version,
            model_fingerprint,
            position,
            tokens,
            rng,
            generated,
            layers,
        })
    }
}

fn decode_shape(r: &mut Reader<'_>) -> Result<LayerShape, WireError> {
    const WHAT: &str = "StateBegin.layers";
    Ok(match r.u8("StateBegin.layers.kind")? {
        KIND_DELTANET => LayerShape::DeltaNet {
            conv_rows: r.u32(WHAT)?,
            conv_dim: r.u32(WHAT)?,
            v_heads: r.u32(WHAT)?,
            k_head_dim: r.u32(WHAT)?,
            v_head_dim: r.u32(WHAT)?,
        },
        KIND_ATTENTION => LayerShape::Attention {
            kv_heads: r.u32(WHAT)?,
            head_dim: r.u32(WHAT)?,
            block_tokens: r.u32(WHAT)?,
            dtype: decode_dtype(r, "StateBegin.layers.dtype")?,
        },
        k => {
            return Err(WireError::Malformed {
                what: "StateBegin.layers.kind",
                detail: format!("unknown layer kind {k}"),
            });
        }
    })
}

/// A [`KvDtype`] code.
pub(super) fn decode_dtype(r: &mut Reader<'_>, what: &'static str) -> Result<KvDtype, WireError> {
    let raw = r.u8(what)?;
    KvDtype::from_u8(raw).ok_or_else(|| WireError::Malformed {
        what,
        detail: format!("unknown KV dtype {raw}"),
    })
}
