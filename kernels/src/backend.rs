//! The backend interface: what model code may ask of a compute device.
//!
//! The operations are deliberately coarse (one call = one fused kernel on a GPU): a mixer call
//! takes the packed projections of a whole varlen batch plus each sequence's state and writes
//! the mixer output, so a backend is free to choose its own memory layout and parallelism.
//! Tensors are row-major f32 `[rows, cols]`; a batch packs the new tokens of several sequences
//! one after another, and a [`SeqSpan`] says where each sequence's tokens are.

use std::sync::Arc;

use crate::KernelError;
use crate::kv::KvCacheSpec;
use myriad_wire::Routes;

/// Storage type of a weight matrix as a checkpoint provides it (after loader conversion).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    BF16,
}

impl WeightDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::BF16 => "bf16",
        }
    }
}

/// A weight matrix `[rows, cols]` in host memory, row-major little-endian: a linear layer's
/// `[out_features, in_features]` or an embedding table's `[vocab, hidden]`.
#[derive(Clone, Copy, Debug)]
pub struct HostMatrix<'a> {
    pub dtype: WeightDtype,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> HostMatrix<'a> {
    /// Checks that `data` holds exactly `rows * cols` elements of `dtype`.
    pub fn new(
        dtype: WeightDtype,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        let expected = rows * cols * dtype.size();
        if data.len() != expected {
            return Err(KernelError::MatrixBytes {
                rows,
                cols,
                dtype: dtype.name(),
                expected,
                actual: data.len(),
            });
        }
        Ok(HostMatrix {
            dtype,
            rows,
            cols,
            data,
        })
    }

    /// Element `(r, c)` widened to f32 (slow; for tests and reference paths).
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let i = r * self.cols + c;
        match self.dtype {
            WeightDtype::F32 => {
                let b = &self.data[i * 4..i * 4 + 4];
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
            WeightDtype::BF16 => {
                let b = &self.data[i * 2..i * 2 + 2];
                f32::from_bits((u32::from(u16::from_le_bytes([b[0], b[1]]))) << 16)
            }
        }
    }
}

/// How a prepared matrix will be read, so a backend can pick its layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatrixUse {
    /// The weight of `y = x Wᵀ`.
    Linear,
    /// A table whose rows are looked up by index (token embeddings).
    Lookup,
}

/// Where one sequence's new tokens sit in a packed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqSpan {
    /// First row of this sequence in the packed batch.
    pub start: usize,
    /// Number of new tokens (rows).
    pub len: usize,
    /// Tokens the sequence's state already holds; the first new token has position `past`.
    pub past: usize,
}

/// Shape of one Gated DeltaNet layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeltaNetDims {
    pub num_k_heads: usize,
    pub num_v_heads: usize,
    pub k_head_dim: usize,
    pub v_head_dim: usize,
    pub conv_kernel: usize,
    /// Epsilon of the gated RMSNorm on the output (`rms_norm_eps`).
    pub norm_eps: f32,
}

impl DeltaNetDims {
    pub fn key_dim(&self) -> usize {
        self.num_k_heads * self.k_head_dim
    }
    pub fn value_dim(&self) -> usize {
        self.num_v_heads * self.v_head_dim
    }
    /// Channels of the causal conv: `[q | k | v]`.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
    /// Width of the fused input projection `[q | k | v | z | b | a]`.
    pub fn proj_dim(&self) -> usize {
        self.conv_dim() + self.value_dim() + 2 * self.num_v_heads
    }
    /// Value heads per q/k head.
    pub fn heads_per_key(&self) -> usize {
        self.num_v_heads / self.num_k_heads
    }
}

/// Shape of one gated full-attention layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionDims {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Leading dims of each head that get rotary embedding (`head_dim * partial_rotary_factor`).
    pub rotary_dim: usize,
    pub rope_theta: f32,
    /// YaRN context extension of the rotary frequencies (`None`: plain RoPE).
    pub yarn: Option<YarnScaling>,
    /// Epsilon of `q_norm` / `k_norm`.
    pub norm_eps: f32,
}

/// YaRN rope scaling (spec §2.4), as every backend computes its frequencies from it
/// ([`crate::rope::frequencies`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct YarnScaling {
    pub factor: f64,
    /// The trained context `L₀` the correction range is computed for.
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Multiplier of cos and sin.
    pub attention_factor: f64,
    /// Round the correction range outward to whole dims.
    pub truncate: bool,
}

impl AttentionDims {
    /// Width of the fused projection `[q_proj (per head: q | gate) | k | v]`.
    pub fn proj_dim(&self) -> usize {
        2 * self.num_heads * self.head_dim + 2 * self.num_kv_heads * self.head_dim
    }
    /// Width of the mixer output before `o_proj`.
    pub fn out_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
}

/// Parameters of one Gated DeltaNet layer that live next to the kernels (not matmul weights).
pub struct DeltaNetLayer<B: Backend> {
    pub dims: DeltaNetDims,
    /// Depthwise conv taps `[conv_dim, conv_kernel]`; tap `K-1` multiplies the current token.
    pub conv_weight: B::Tensor,
    /// `A_log` `[1, num_v_heads]`, kept in f32.
    pub a_log: B::Tensor,
    /// `dt_bias` `[1, num_v_heads]`.
    pub dt_bias: B::Tensor,
    /// Gated-RMSNorm weight `[1, v_head_dim]` (a plain multiplier, not `1 + w`).
    pub norm_weight: B::Tensor,
}

/// Parameters of one gated attention layer that live next to the kernels.
pub struct AttentionLayer<B: Backend> {
    pub dims: AttentionDims,
    /// `1 + q_norm.weight` `[1, head_dim]`.
    pub q_norm: B::Tensor,
    /// `1 + k_norm.weight` `[1, head_dim]`.
    pub k_norm: B::Tensor,
}

/// One routed expert's weights: `gate_up` is `[2I, H]` (gate rows first), `down` is `[H, I]`.
pub struct ExpertMatrices<B: Backend> {
    pub gate_up: B::Matrix,
    pub down: B::Matrix,
}

/// A DeltaNet layer's per-sequence state in host memory, in Myriad's canonical layout.
#[derive(Clone, Debug, PartialEq)]
pub struct DeltaStateHost {
    /// The last `K-1` raw (pre-conv) projected vectors, oldest first: `[K-1, conv_dim]`.
    pub conv: Vec<f32>,
    /// Recurrent state `[num_v_heads, k_head_dim, v_head_dim]` (the transformers/FLA layout).
    pub recurrent: Vec<f32>,
}

/// An attention layer's KV cache in host memory: `[len, num_kv_heads, head_dim]` each; keys
/// are after `k_norm` and RoPE.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCacheHost {
    pub len: usize,
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

/// One stored KV block as bytes: keys then values, each `[block_tokens, kv_heads, head_dim]`
/// little-endian elements of the cache's [`KvDtype`](crate::KvDtype) (unused slots zero), and
/// the scales that turn stored values into actual ones.
#[derive(Clone, Debug, PartialEq)]
pub struct KvBlockHost {
    pub key_scale: f32,
    pub value_scale: f32,
    pub data: Vec<u8>,
}

/// An attention layer's KV cache as stored: its layout, length and blocks (what a state
/// transfer or a prefix cache moves, without decoding).
#[derive(Clone, Debug, PartialEq)]
pub struct KvBlocksHost {
    pub spec: KvCacheSpec,
    pub len: usize,
    pub blocks: Vec<KvBlockHost>,
}

/// A compute device. All tensors are f32 row-major `[rows, cols]`.
///
/// Shapes of tensors that model code passes between calls are invariants of the model code:
/// a mismatch panics. Failures that depend on data (bad token ids, missing experts, malformed
/// host bytes) are returned as [`KernelError`].
pub trait Backend: Send + Sync + Sized + 'static {
    /// A dense f32 tensor on the device.
    type Tensor: Send + Sync + 'static;
    /// A prepared weight matrix (the backend's own layout and dtype).
    type Matrix: Send + Sync + 'static;
    /// One DeltaNet layer's state for one sequence.
    type DeltaState: Send + Sync + 'static;
    /// One attention layer's paged KV cache for one sequence.
    type KvCache: Send + Sync + 'static;

    /// Human-readable device name (e.g. "cpu (avx512, 2 threads)").
    fn name(&self) -> String;

    /// Called on a thread that is about to load weights in the background, while other
    /// threads serve: the backend may change how that thread allocates. The default does
    /// nothing.
    fn prepare_background_thread(&self) {}

    // ---- memory --------------------------------------------------------------------------

    fn zeros(&self, rows: usize, cols: usize) -> Self::Tensor;
    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<Self::Tensor, KernelError>;
    fn download(&self, t: &Self::Tensor) -> Vec<f32>;
    /// `(rows, cols)`.
    fn shape(&self, t: &Self::Tensor) -> (usize, usize);
    /// Copies rows `rows` of `x` (in that order) into a new tensor.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Self::Tensor;

    /// Prepares a weight for `usage`; the host bytes may be dropped afterwards.
    fn matrix(&self, host: HostMatrix<'_>, usage: MatrixUse) -> Result<Self::Matrix, KernelError>;
    /// `(rows, cols)` of the original matrix.
    fn matrix_shape(&self, m: &Self::Matrix) -> (usize, usize);
    /// Bytes one full pass over the matrix reads (its resident size).
    fn matrix_bytes(&self, m: &Self::Matrix) -> usize;

    // ---- dense ops -----------------------------------------------------------------------

    /// `out[i] = table[ids[i]]`; `out` is `[ids.len(), hidden]`.
    fn embed(
        &self,
        table: &Self::Matrix,
        ids: &[u32],
        out: &mut Self::Tensor,
    ) -> Result<(), KernelError>;
    /// `out = x Wᵀ`; `x` is `[n, in]`, `out` is `[n, out]`.
    fn matmul(&self, x: &Self::Tensor, w: &Self::Matrix, out: &mut Self::Tensor);
    /// Row-wise `out = x / sqrt(mean(x²) + eps) * weight` (`weight` is `[1, cols]`; zero-centred
    /// norms pass `1 + w`).
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Tensor, eps: f32, out: &mut Self::Tensor);
    /// `residual += delta`, then `out = rms_norm(residual)`.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        delta: &Self::Tensor,
        weight: &Self::Tensor,
        eps: f32,
        out: &mut Self::Tensor,
    );
    /// `acc += x`.
    fn add(&self, acc: &mut Self::Tensor, x: &Self::Tensor);
    /// `out[:, j] = silu(gate_up[:, j]) * gate_up[:, I + j]` for `j < I = out.cols`;
    /// `gate_up` may have further trailing columns, which are ignored.
    fn swiglu(&self, gate_up: &Self::Tensor, out: &mut Self::Tensor);
    /// `acc[r] += sigmoid(gate[r, gate_col]) * x[r]` for every row.
    fn add_sigmoid_gated(
        &self,
        acc: &mut Self::Tensor,
        x: &Self::Tensor,
        gate: &Self::Tensor,
        gate_col: usize,
    );

    // ---- mixers --------------------------------------------------------------------------

    fn new_delta_state(&self, dims: &DeltaNetDims) -> Self::DeltaState;
    /// An empty KV cache that takes blocks of `spec` as it grows.
    fn new_kv_cache(&self, dims: &AttentionDims, spec: &KvCacheSpec) -> Self::KvCache;
    /// KV blocks alive across every cache of this backend (what the block pool really holds).
    fn kv_blocks_live(&self) -> usize;

    /// The Gated DeltaNet mixer up to (not including) `out_proj`: causal conv with carried
    /// state, SiLU, q/k L2 norm, gates, the delta rule (recurrent for one token, chunked for
    /// more), gated RMSNorm. `proj` is `[n, dims.proj_dim()]` laid out `[q | k | v | z | b | a]`;
    /// `out` is `[n, dims.value_dim()]`. `states[i]` belongs to `spans[i]` and is advanced.
    fn gated_deltanet(
        &self,
        layer: &DeltaNetLayer<Self>,
        proj: &Self::Tensor,
        spans: &[SeqSpan],
        states: &mut [&mut Self::DeltaState],
        out: &mut Self::Tensor,
    );

    /// The gated attention mixer up to (not including) `o_proj`: q/k norm, partial RoPE, KV
    /// cache append, causal GQA softmax attention, sigmoid output gate. `proj` is
    /// `[n, dims.proj_dim()]`; `out` is `[n, dims.out_dim()]`.
    fn gated_attention(
        &self,
        layer: &AttentionLayer<Self>,
        proj: &Self::Tensor,
        spans: &[SeqSpan],
        caches: &mut [&mut Self::KvCache],
        out: &mut Self::Tensor,
    );

    // ---- mixture of experts --------------------------------------------------------------

    /// Softmax over each row of router `logits` (f32), top-`k`, and (if `renormalize`) weights
    /// divided by their sum. Experts in each row are ordered by decreasing probability.
    fn route(&self, logits: &Self::Tensor, k: usize, renormalize: bool) -> Routes;

    /// `out[r] = Σ_j w_j · Expert_{e_j}(x[r])` over row `r`'s pairs in `routes`, summed in
    /// route order; `Expert_e(v) = (silu(v G_eᵀ) ⊙ v U_eᵀ) D_eᵀ`. `experts[e]` holds expert `e`
    /// (None: not held here, an error if routed to).
    fn moe_experts(
        &self,
        x: &Self::Tensor,
        routes: &Routes,
        experts: &[Option<Arc<ExpertMatrices<Self>>>],
        out: &mut Self::Tensor,
    ) -> Result<(), KernelError>;

    // ---- state import and export (migration, snapshots, tests) ---------------------------

    fn delta_state_to_host(&self, s: &Self::DeltaState) -> DeltaStateHost;
    fn delta_state_from_host(
        &self,
        dims: &DeltaNetDims,
        host: &DeltaStateHost,
    ) -> Result<Self::DeltaState, KernelError>;
    /// Every key and value, decoded to f32.
    fn kv_cache_to_host(&self, c: &Self::KvCache) -> KvCacheHost;
    /// A cache of `spec` holding `host`'s keys and values (encoded to `spec`'s dtype).
    fn kv_cache_from_host(
        &self,
        dims: &AttentionDims,
        spec: &KvCacheSpec,
        host: &KvCacheHost,
    ) -> Result<Self::KvCache, KernelError>;
    /// The blocks as stored, without decoding.
    fn kv_cache_export(&self, c: &Self::KvCache) -> KvBlocksHost;
    /// A cache holding exported blocks; they must fit `dims` and carry a consistent length.
    fn kv_cache_import(
        &self,
        dims: &AttentionDims,
        host: &KvBlocksHost,
    ) -> Result<Self::KvCache, KernelError>;
    /// Blocks a KV cache holds.
    fn kv_cache_blocks(&self, c: &Self::KvCache) -> usize;
    /// Tokens held by a KV cache.
    fn kv_cache_len(&self, c: &Self::KvCache) -> usize;
    /// Drops cached tokens past `len` (speculation rollback, shared-prefix reuse).
    fn kv_cache_truncate(&self, c: &mut Self::KvCache, len: usize);
}
