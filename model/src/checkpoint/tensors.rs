//! The tensors a checkpoint hands out: [`HostTensor`] (bytes in BF16 or F32, borrowed from the
//! mapped file where no conversion was needed) and the per-layer / per-expert groupings in the
//! one canonical (Qwen3.5) layout.

use std::borrow::Cow;

use myriad_kernels::{HostMatrix, WeightDtype};

use super::convert::{bf16_le, f32_le};

/// One weight in host memory, row-major little-endian.
#[derive(Clone, Debug)]
pub struct HostTensor<'a> {
    /// The checkpoint tensor it came from (with a slice suffix for experts / regrouped rows).
    pub name: String,
    pub dtype: WeightDtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl<'a> HostTensor<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tensor as a matrix: 2-D as is, 1-D `[n]` as `[1, n]` (any leading dims fold into rows).
    pub fn matrix(&self) -> HostMatrix<'_> {
        let cols = self.shape.last().copied().unwrap_or(1);
        let rows = self.shape.iter().rev().skip(1).product();
        HostMatrix {
            dtype: self.dtype,
            rows,
            cols,
            data: &self.data,
        }
    }

    /// All elements widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            WeightDtype::F32 => self.data.chunks_exact(4).map(f32_le).collect(),
            WeightDtype::BF16 => self.data.chunks_exact(2).map(bf16_le).collect(),
        }
    }

    /// Detaches from the mapped file (copies borrowed bytes).
    pub fn into_owned(self) -> HostTensor<'static> {
        HostTensor {
            name: self.name,
            dtype: self.dtype,
            shape: self.shape,
            data: Cow::Owned(self.data.into_owned()),
        }
    }
}

/// Everything of one decoder layer except its routed experts.
#[derive(Clone, Debug)]
pub struct LayerTensors<'a> {
    /// `[H]`, zero-centred as stored (applied as `1 + w`).
    pub input_norm: HostTensor<'a>,
    /// `[H]`, zero-centred as stored.
    pub post_attention_norm: HostTensor<'a>,
    pub mixer: MixerTensors<'a>,
    /// `mlp.gate.weight` `[E, H]`.
    pub router: HostTensor<'a>,
    /// `[Is, H]`.
    pub shared_gate_proj: HostTensor<'a>,
    /// `[Is, H]`.
    pub shared_up_proj: HostTensor<'a>,
    /// `[H, Is]`.
    pub shared_down_proj: HostTensor<'a>,
    /// `[1, H]`.
    pub shared_expert_gate: HostTensor<'a>,
}

/// The token mixer's weights. Built once per layer at load time, so the size difference
/// between the variants does not matter.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum MixerTensors<'a> {
    Linear(LinearAttnTensors<'a>),
    Full(FullAttnTensors<'a>),
}

/// Gated DeltaNet weights, always in the Qwen3.5 layout.
#[derive(Clone, Debug)]
pub struct LinearAttnTensors<'a> {
    /// `[2·nk·dk + nv·dv, H]`, rows `[q | k | v]`, heads contiguous.
    pub in_proj_qkv: HostTensor<'a>,
    /// `[nv·dv, H]`.
    pub in_proj_z: HostTensor<'a>,
    /// `[nv, H]`.
    pub in_proj_b: HostTensor<'a>,
    /// `[nv, H]`.
    pub in_proj_a: HostTensor<'a>,
    /// `[conv_dim, K]` (stored `[conv_dim, 1, K]`).
    pub conv1d: HostTensor<'a>,
    /// `[nv]`.
    pub dt_bias: HostTensor<'a>,
    /// `[nv]`, always F32.
    pub a_log: HostTensor<'a>,
    /// `[dv]`, plain (not zero-centred) gated-norm weight.
    pub norm: HostTensor<'a>,
    /// `[H, nv·dv]`.
    pub out_proj: HostTensor<'a>,
}

/// Gated softmax-attention weights.
#[derive(Clone, Debug)]
pub struct FullAttnTensors<'a> {
    /// `[2·nh·hd, H]`, per head `[q (hd) | gate (hd)]`.
    pub q_proj: HostTensor<'a>,
    /// `[nkv·hd, H]`.
    pub k_proj: HostTensor<'a>,
    /// `[nkv·hd, H]`.
    pub v_proj: HostTensor<'a>,
    /// `[H, nh·hd]`.
    pub o_proj: HostTensor<'a>,
    /// `[hd]`, zero-centred.
    pub q_norm: HostTensor<'a>,
    /// `[hd]`, zero-centred.
    pub k_norm: HostTensor<'a>,
}

/// One routed expert's SwiGLU weights.
#[derive(Clone, Debug)]
pub struct ExpertTensors<'a> {
    /// `[I, H]`.
    pub gate_proj: HostTensor<'a>,
    /// `[I, H]`.
    pub up_proj: HostTensor<'a>,
    /// `[H, I]`.
    pub down_proj: HostTensor<'a>,
}
