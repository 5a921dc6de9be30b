//! A model's weights, read from a Hugging Face safetensors checkpoint of either family and
//! handed out in one canonical layout (spec §3, fixtures README "Checkpoint layout").
//!
//! Handles: single-file or sharded (lazily mapped) checkpoints, the `model.language_model.` or
//! `model.` text prefix, fused (`gate_up_proj [E, 2I, H]`) or per-expert routed experts (either
//! family), Qwen3-Next's grouped DeltaNet projections (regrouped to the Qwen3.5 order), and
//! BF16 / F32 / F16 / block-scaled F8_E4M3 storage. Every shape is checked against the config.
//!
//! Submodules: `store` (files, index, lazy mmap), `load` (one tensor: shape check, slicing,
//! scales), `convert` (dtypes), [`regroup`] (Qwen3-Next row order), `tensors` (public types).

mod convert;
mod error;
mod load;
pub mod regroup;
mod store;
mod tensors;

use std::borrow::Cow;
use std::path::Path;

pub use convert::{FP8_BLOCK, e4m3_to_f32};
pub use error::CheckpointError;
pub use tensors::{
    ExpertTensors, FullAttnTensors, HostTensor, LayerTensors, LinearAttnTensors, MixerTensors,
};

use crate::config::{LayerKind, ModelConfig};
use convert::Want;
use load::{Request, Select};
use regroup::DeltaNetHeads;
use store::Store;

/// Text-model prefixes, most specific first (Qwen3.5 release, then everything else).
const TEXT_PREFIXES: [&str; 2] = ["model.language_model.", "model."];
const LM_HEAD: &str = "lm_head.weight";

/// An opened checkpoint. Tensors borrow from the mapped files where no conversion was needed.
pub struct Checkpoint {
    store: Store,
    config: ModelConfig,
    prefix: &'static str,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("listing", &self.store.listing())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Checkpoint {
    /// Validates `config`, opens `dir/model.safetensors.index.json` (shards are mapped on first
    /// use) or `dir/model.safetensors`, and finds the text model's tensor prefix.
    pub fn open(dir: &Path, config: &ModelConfig) -> Result<Checkpoint, CheckpointError> {
        // Validated sizes cannot overflow the shape arithmetic below.
        config.validate()?;
        let store = Store::open(dir)?;
        let prefix = TEXT_PREFIXES
            .into_iter()
            .find(|p| store.contains(&format!("{p}embed_tokens.weight")))
            .ok_or_else(|| CheckpointError::NoTextModel {
                location: store.listing().display().to_string(),
                tried: TEXT_PREFIXES
                    .iter()
                    .map(|p| format!("`{p}embed_tokens.weight`"))
                    .collect(),
            })?;
        Ok(Checkpoint {
            store,
            config: config.clone(),
            prefix,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// `model.language_model.` or `model.`.
    pub fn text_prefix(&self) -> &str {
        self.prefix
    }

    /// Every tensor name the checkpoint lists, sorted (including ones we ignore).
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.store.names().map(str::to_string).collect();
        names.sort();
        names
    }

    /// `[V, H]`.
    pub fn embed_tokens(&self) -> Result<HostTensor<'_>, CheckpointError> {
        let c = &self.config;
        self.whole(
            &format!("{}embed_tokens.weight", self.prefix),
            &[c.vocab_size, c.hidden_size],
        )
    }

    /// `[V, H]`; the embedding when the config ties them.
    pub fn lm_head(&self) -> Result<HostTensor<'_>, CheckpointError> {
        if self.config.tie_word_embeddings {
            return self.embed_tokens();
        }
        self.whole(LM_HEAD, &[self.config.vocab_size, self.config.hidden_size])
    }

    /// `[H]`, zero-centred as stored.
    pub fn final_norm(&self) -> Result<HostTensor<'_>, CheckpointError> {
        self.whole(
            &format!("{}norm.weight", self.prefix),
            &[self.config.hidden_size],
        )
    }

    /// All weights of layer `l` except its routed experts.
    pub fn layer(&self, l: usize) -> Result<LayerTensors<'_>, CheckpointError> {
        let c = &self.config;
        let kind = c.layer_kind(l).ok_or(CheckpointError::NoSuchLayer {
            layer: l,
            layers: c.num_layers,
        })?;
        let (h, e, is) = (
            c.hidden_size,
            c.num_experts,
            c.shared_expert_intermediate_size,
        );
        let p = |suffix: &str| self.layer_name(l, suffix);
        let mixer = match kind {
            LayerKind::LinearAttention => MixerTensors::Linear(self.linear_attn(l)?),
            LayerKind::FullAttention => MixerTensors::Full(self.full_attn(l)?),
        };
        Ok(LayerTensors {
            input_norm: self.whole(&p("input_layernorm.weight"), &[h])?,
            post_attention_norm: self.whole(&p("post_attention_layernorm.weight"), &[h])?,
            mixer,
            router: self.whole(&p("mlp.gate.weight"), &[e, h])?,
            shared_gate_proj: self.whole(&p("mlp.shared_expert.gate_proj.weight"), &[is, h])?,
            shared_up_proj: self.whole(&p("mlp.shared_expert.up_proj.weight"), &[is, h])?,
            shared_down_proj: self.whole(&p("mlp.shared_expert.down_proj.weight"), &[h, is])?,
            shared_expert_gate: self.whole(&p("mlp.shared_expert_gate.weight"), &[1, h])?,
        })
    }

    /// Routed expert `e` of layer `l`, from fused or per-expert tensors (whichever exist).
    pub fn expert(&self, l: usize, e: usize) -> Result<ExpertTensors<'_>, CheckpointError> {
        let c = &self.config;
        if l >= c.num_layers {
            return Err(CheckpointError::NoSuchLayer {
                layer: l,
                layers: c.num_layers,
            });
        }
        if e >= c.num_experts {
            return Err(CheckpointError::NoSuchExpert {
                expert: e,
                experts: c.num_experts,
            });
        }
        let (h, i, n) = (c.hidden_size, c.moe_intermediate_size, c.num_experts);
        let fused = self.layer_name(l, "mlp.experts.gate_up_proj");
        if self.store.contains(&fused) {
            let down = self.layer_name(l, "mlp.experts.down_proj");
            let slice =
                |name: &str, stored: &[usize], rows: std::ops::Range<usize>, out: &[usize]| {
                    load::load(
                        &self.store,
                        Request {
                            name,
                            accept: &[stored],
                            out_shape: out.to_vec(),
                            want: Want::Weight,
                            select: Select::SlabRows { slab: e, rows },
                        },
                    )
                };
            return Ok(ExpertTensors {
                gate_proj: slice(&fused, &[n, 2 * i, h], 0..i, &[i, h])?,
                up_proj: slice(&fused, &[n, 2 * i, h], i..2 * i, &[i, h])?,
                down_proj: slice(&down, &[n, h, i], 0..h, &[h, i])?,
            });
        }
        let p = |proj: &str| self.layer_name(l, &format!("mlp.experts.{e}.{proj}.weight"));
        Ok(ExpertTensors {
            gate_proj: self.whole(&p("gate_proj"), &[i, h])?,
            up_proj: self.whole(&p("up_proj"), &[i, h])?,
            down_proj: self.whole(&p("down_proj"), &[h, i])?,
        })
    }

    fn layer_name(&self, l: usize, suffix: &str) -> String {
        format!("{}layers.{l}.{suffix}", self.prefix)
    }

    fn whole(&self, name: &str, shape: &[usize]) -> Result<HostTensor<'_>, CheckpointError> {
        load::load(&self.store, Request::whole(name, &[shape], shape))
    }

    fn linear_attn(&self, l: usize) -> Result<LinearAttnTensors<'_>, CheckpointError> {
        let c = &self.config;
        let (h, nv, dv) = (
            c.hidden_size,
            c.linear_num_value_heads,
            c.linear_value_head_dim,
        );
        let (conv, kernel) = (c.conv_dim(), c.linear_conv_kernel);
        let p = |suffix: &str| self.layer_name(l, &format!("linear_attn.{suffix}"));
        let (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a) =
            if self.store.contains(&p("in_proj_qkvz.weight")) {
                self.grouped_projections(l)?
            } else {
                (
                    self.whole(&p("in_proj_qkv.weight"), &[conv, h])?,
                    self.whole(&p("in_proj_z.weight"), &[nv * dv, h])?,
                    self.whole(&p("in_proj_b.weight"), &[nv, h])?,
                    self.whole(&p("in_proj_a.weight"), &[nv, h])?,
                )
            };
        let a_log_name = p("A_log");
        Ok(LinearAttnTensors {
            in_proj_qkv,
            in_proj_z,
            in_proj_b,
            in_proj_a,
            conv1d: load::load(
                &self.store,
                Request::whole(
                    &p("conv1d.weight"),
                    &[&[conv, 1, kernel], &[conv, kernel]],
                    &[conv, kernel],
                ),
            )?,
            dt_bias: self.whole(&p("dt_bias"), &[nv])?,
            a_log: load::load(
                &self.store,
                Request {
                    want: Want::F32,
                    ..Request::whole(&a_log_name, &[&[nv]], &[nv])
                },
            )?,
            norm: self.whole(&p("norm.weight"), &[dv])?,
            out_proj: self.whole(&p("out_proj.weight"), &[h, nv * dv])?,
        })
    }

    fn full_attn(&self, l: usize) -> Result<FullAttnTensors<'_>, CheckpointError> {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let p = |suffix: &str| self.layer_name(l, &format!("self_attn.{suffix}"));
        Ok(FullAttnTensors {
            q_proj: self.whole(&p("q_proj.weight"), &[c.q_proj_rows(), h])?,
            k_proj: self.whole(&p("k_proj.weight"), &[c.kv_dim(), h])?,
            v_proj: self.whole(&p("v_proj.weight"), &[c.kv_dim(), h])?,
            o_proj: self.whole(&p("o_proj.weight"), &[h, c.attn_output_dim()])?,
            q_norm: self.whole(&p("q_norm.weight"), &[hd])?,
            k_norm: self.whole(&p("k_norm.weight"), &[hd])?,
        })
    }

    /// Qwen3-Next `in_proj_qkvz` / `in_proj_ba` → `(qkv, z, b, a)` in the Qwen3.5 order.
    #[allow(clippy::type_complexity)]
    fn grouped_projections(
        &self,
        l: usize,
    ) -> Result<
        (
            HostTensor<'_>,
            HostTensor<'_>,
            HostTensor<'_>,
            HostTensor<'_>,
        ),
        CheckpointError,
    > {
        let c = &self.config;
        let h = c.hidden_size;
        let heads = DeltaNetHeads {
            key_heads: c.linear_num_key_heads,
            key_head_dim: c.linear_key_head_dim,
            value_heads: c.linear_num_value_heads,
            value_head_dim: c.linear_value_head_dim,
        };
        let qkvz_rows = 2 * c.key_dim() + 2 * c.value_dim();
        let qkvz = self.whole(
            &self.layer_name(l, "linear_attn.in_proj_qkvz.weight"),
            &[qkvz_rows, h],
        )?;
        let ba = self.whole(
            &self.layer_name(l, "linear_attn.in_proj_ba.weight"),
            &[2 * c.linear_num_value_heads, h],
        )?;
        let row_bytes = h * qkvz.dtype.size();
        // Shapes were checked above, so the splits always fit.
        let regroup_failed = |t: &HostTensor<'_>| CheckpointError::Shape {
            tensor: t.name.clone(),
            path: self.store.listing().to_path_buf(),
            expected: t.shape.clone(),
            actual: vec![t.data.len()],
        };
        let (qkv, z) = regroup::split_qkvz(&qkvz.data, row_bytes, heads)
            .ok_or_else(|| regroup_failed(&qkvz))?;
        let (b, a) = regroup::split_ba(&ba.data, h * ba.dtype.size(), heads)
            .ok_or_else(|| regroup_failed(&ba))?;
        let part = |src: &HostTensor<'_>, what: &str, rows: usize, data: Vec<u8>| HostTensor {
            name: format!("{}[{what}]", src.name),
            dtype: src.dtype,
            shape: vec![rows, h],
            data: Cow::Owned(data),
        };
        let nv = c.linear_num_value_heads;
        Ok((
            part(&qkvz, "qkv", c.conv_dim(), qkv),
            part(&qkvz, "z", c.value_dim(), z),
            part(&ba, "b", nv, b),
            part(&ba, "a", nv, a),
        ))
    }
}
