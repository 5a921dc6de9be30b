//! The dense weights of the attention side, prepared on the backend from a checkpoint.
//!
//! Loading fuses what is always multiplied by the same input into one matrix, so each layer
//! reads its input once per matmul call: the DeltaNet input projections become one
//! `[q | k | v | z | b | a]` matrix, the attention projections one `[q/gate | k | v]` matrix,
//! and the shared expert's gate, up and scalar gate one `[2·Is + 1, H]` matrix. Zero-centred
//! norm weights are stored as `1 + w` in f32; conv taps are transposed to tap-major.

use myriad_kernels::{
    AttentionDims, AttentionLayer, Backend, DeltaNetDims, DeltaNetLayer, HostMatrix, MatrixUse,
    WeightDtype, YarnScaling,
};
use myriad_model::checkpoint::{Checkpoint, HostTensor, MixerTensors};
use myriad_model::config::{LayerKind, ModelConfig};

use crate::error::EngineError;

/// A layer's mixer.
pub enum MixerWeights<B: Backend> {
    DeltaNet {
        in_proj: B::Matrix,
        params: DeltaNetLayer<B>,
        out_proj: B::Matrix,
    },
    Attention {
        in_proj: B::Matrix,
        params: AttentionLayer<B>,
        out_proj: B::Matrix,
    },
}

/// One decoder layer's dense weights.
pub struct LayerWeights<B: Backend> {
    pub input_norm: B::Tensor,
    pub post_norm: B::Tensor,
    pub mixer: MixerWeights<B>,
    /// Router `[E, H]`.
    pub router: B::Matrix,
    /// `[shared gate_proj (Is) | shared up_proj (Is) | shared_expert_gate (1)]` × H.
    pub shared_gate_up: B::Matrix,
    /// `[H, Is]`.
    pub shared_down: B::Matrix,
}

/// All dense weights.
pub struct DenseWeights<B: Backend> {
    pub embed: B::Matrix,
    pub lm_head: B::Matrix,
    pub final_norm: B::Tensor,
    pub layers: Vec<LayerWeights<B>>,
}

/// Shape of layer `l`'s DeltaNet mixer.
pub fn deltanet_dims(c: &ModelConfig) -> DeltaNetDims {
    DeltaNetDims {
        num_k_heads: c.linear_num_key_heads,
        num_v_heads: c.linear_num_value_heads,
        k_head_dim: c.linear_key_head_dim,
        v_head_dim: c.linear_value_head_dim,
        conv_kernel: c.linear_conv_kernel,
        norm_eps: c.rms_norm_eps as f32,
    }
}

/// Shape of the attention mixers.
pub fn attention_dims(c: &ModelConfig) -> AttentionDims {
    AttentionDims {
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        rotary_dim: c.rotary_dim,
        rope_theta: c.rope_theta as f32,
        yarn: c.yarn.as_ref().map(|y| YarnScaling {
            factor: y.factor,
            original_max_position_embeddings: y.original_max_position_embeddings,
            beta_fast: y.beta_fast,
            beta_slow: y.beta_slow,
            attention_factor: y.attention_factor,
            truncate: y.truncate,
        }),
        norm_eps: c.rms_norm_eps as f32,
    }
}

impl<B: Backend> DenseWeights<B> {
    pub fn load(backend: &B, config: &ModelConfig, ckpt: &Checkpoint) -> Result<Self, EngineError> {
        let embed_t = ckpt.embed_tokens()?;
        let embed = matrix(backend, &embed_t, MatrixUse::Lookup)?;
        let lm_head = matrix(backend, &ckpt.lm_head()?, MatrixUse::Linear)?;
        let final_norm = centred_norm(backend, &ckpt.final_norm()?)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let t = ckpt.layer(l)?;
            let mixer = match (&t.mixer, config.layer_kinds[l]) {
                (MixerTensors::Linear(m), LayerKind::LinearAttention) => {
                    let dims = deltanet_dims(config);
                    MixerWeights::DeltaNet {
                        in_proj: fused(
                            backend,
                            &[&m.in_proj_qkv, &m.in_proj_z, &m.in_proj_b, &m.in_proj_a],
                        )?,
                        params: DeltaNetLayer {
                            dims,
                            conv_weight: conv_taps(backend, &m.conv1d)?,
                            a_log: vector(backend, &m.a_log)?,
                            dt_bias: vector(backend, &m.dt_bias)?,
                            norm_weight: vector(backend, &m.norm)?,
                        },
                        out_proj: matrix(backend, &m.out_proj, MatrixUse::Linear)?,
                    }
                }
                (MixerTensors::Full(m), LayerKind::FullAttention) => MixerWeights::Attention {
                    in_proj: fused(backend, &[&m.q_proj, &m.k_proj, &m.v_proj])?,
                    params: AttentionLayer {
                        dims: attention_dims(config),
                        q_norm: centred_norm(backend, &m.q_norm)?,
                        k_norm: centred_norm(backend, &m.k_norm)?,
                    },
                    out_proj: matrix(backend, &m.o_proj, MatrixUse::Linear)?,
                },
                _ => {
                    return Err(EngineError::Batch(format!(
                        "layer {l}: checkpoint mixer does not match the config's layer type"
                    )));
                }
            };
            layers.push(LayerWeights {
                input_norm: centred_norm(backend, &t.input_norm)?,
                post_norm: centred_norm(backend, &t.post_attention_norm)?,
                mixer,
                router: matrix(backend, &t.router, MatrixUse::Linear)?,
                shared_gate_up: fused(
                    backend,
                    &[
                        &t.shared_gate_proj,
                        &t.shared_up_proj,
                        &t.shared_expert_gate,
                    ],
                )?,
                shared_down: matrix(backend, &t.shared_down_proj, MatrixUse::Linear)?,
            });
        }
        Ok(DenseWeights {
            embed,
            lm_head,
            final_norm,
            layers,
        })
    }

    /// Bytes of dense weights one decoded token reads: every matrix once, plus one embedding
    /// row (the lookup reads a single row, not the table).
    pub fn bytes_per_token(&self, backend: &B) -> usize {
        let mut total = backend.matrix_bytes(&self.lm_head);
        let (vocab, _) = backend.matrix_shape(&self.embed);
        total += backend.matrix_bytes(&self.embed) / vocab.max(1);
        for l in &self.layers {
            let (a, b) = match &l.mixer {
                MixerWeights::DeltaNet {
                    in_proj, out_proj, ..
                } => (in_proj, out_proj),
                MixerWeights::Attention {
                    in_proj, out_proj, ..
                } => (in_proj, out_proj),
            };
            total += backend.matrix_bytes(a) + backend.matrix_bytes(b);
            total += backend.matrix_bytes(&l.router);
            total += backend.matrix_bytes(&l.shared_gate_up) + backend.matrix_bytes(&l.shared_down);
        }
        total
    }
}

fn matrix<B: Backend>(
    backend: &B,
    t: &HostTensor<'_>,
    usage: MatrixUse,
) -> Result<B::Matrix, EngineError> {
    backend
        .matrix(t.matrix(), usage)
        .map_err(|source| EngineError::Tensor {
            name: t.name.clone(),
            source,
        })
}

/// One matrix whose rows are the rows of `parts`, in order (converted to f32 if dtypes differ).
fn fused<B: Backend>(backend: &B, parts: &[&HostTensor<'_>]) -> Result<B::Matrix, EngineError> {
    let names = || {
        parts
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mats: Vec<HostMatrix<'_>> = parts.iter().map(|p| p.matrix()).collect();
    let cols = mats[0].cols;
    if let Some(bad) = mats.iter().find(|m| m.cols != cols) {
        return Err(EngineError::Fuse {
            names: names(),
            reason: format!("input widths differ ({cols} vs {})", bad.cols),
        });
    }
    let rows: usize = mats.iter().map(|m| m.rows).sum();
    let dtype = if mats.iter().all(|m| m.dtype == mats[0].dtype) {
        mats[0].dtype
    } else {
        WeightDtype::F32
    };
    let mut bytes = Vec::with_capacity(rows * cols * dtype.size());
    for (m, p) in mats.iter().zip(parts) {
        if m.dtype == dtype {
            bytes.extend_from_slice(m.data);
        } else {
            bytes.extend(p.to_f32().iter().flat_map(|v| v.to_le_bytes()));
        }
    }
    let host =
        HostMatrix::new(dtype, rows, cols, &bytes).map_err(|source| EngineError::Tensor {
            name: names(),
            source,
        })?;
    backend
        .matrix(host, MatrixUse::Linear)
        .map_err(|source| EngineError::Tensor {
            name: names(),
            source,
        })
}

/// `[1, n]` f32 tensor of the values as stored.
fn vector<B: Backend>(backend: &B, t: &HostTensor<'_>) -> Result<B::Tensor, EngineError> {
    let v = t.to_f32();
    backend
        .upload(1, v.len(), &v)
        .map_err(|source| EngineError::Tensor {
            name: t.name.clone(),
            source,
        })
}

/// `[1, n]` f32 tensor of `1 + w` (zero-centred RMSNorm weights).
fn centred_norm<B: Backend>(backend: &B, t: &HostTensor<'_>) -> Result<B::Tensor, EngineError> {
    let v: Vec<f32> = t.to_f32().iter().map(|w| 1.0 + w).collect();
    backend
        .upload(1, v.len(), &v)
        .map_err(|source| EngineError::Tensor {
            name: t.name.clone(),
            source,
        })
}

/// Conv taps `[C, K]` transposed to `[K, C]`.
fn conv_taps<B: Backend>(backend: &B, t: &HostTensor<'_>) -> Result<B::Tensor, EngineError> {
    let m = t.matrix();
    let v = t.to_f32();
    let (c, k) = (m.rows, m.cols);
    let mut taps = vec![0f32; c * k];
    for ch in 0..c {
        for j in 0..k {
            taps[j * c + ch] = v[ch * k + j];
        }
    }
    backend
        .upload(k, c, &taps)
        .map_err(|source| EngineError::Tensor {
            name: t.name.clone(),
            source,
        })
}
