//! Which tensors a synthetic model has, in the family's released layout, and how each is
//! initialised (fixtures README "Weights": magnitudes chosen so that bugs show up).

use crate::config::{Family, LayerKind, ModelConfig};
use myriad_kernels::WeightDtype;

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Init {
    Normal {
        std: f64,
    },
    Uniform {
        lo: f64,
        hi: f64,
    },
    /// Per value head, spread over log(0.005) .. log(4), shuffled, ±0.1 jitter; kept in f32.
    ALog,
}

#[derive(Clone, Debug)]
pub(crate) struct Planned {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: WeightDtype,
    pub init: Init,
}

impl Planned {
    pub(crate) fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub(crate) fn bytes(&self) -> u64 {
        (self.elements() * self.dtype.size()) as u64
    }
}

const ZERO_CENTRED_NORM: Init = Init::Uniform { lo: -0.4, hi: 0.4 };

fn fan_in(n: usize) -> Init {
    Init::Normal {
        std: 1.0 / (n as f64).sqrt(),
    }
}

/// Every tensor of the text model in the family's checkpoint layout, sorted by name (the order
/// `save_pretrained` shards in).
pub(crate) fn plan(c: &ModelConfig, dtype: WeightDtype) -> Vec<Planned> {
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, init: Init| {
        let dtype = if init == Init::ALog {
            WeightDtype::F32
        } else {
            dtype
        };
        out.push(Planned {
            name,
            shape,
            dtype,
            init,
        });
    };
    let prefix = match c.family {
        Family::Qwen3Next => "model.",
        Family::Qwen35Moe => "model.language_model.",
    };
    let (v, h) = (c.vocab_size, c.hidden_size);
    let sharp = Init::Normal {
        std: 1.5 / (h as f64).sqrt(),
    };

    add(
        format!("{prefix}embed_tokens.weight"),
        vec![v, h],
        Init::Normal { std: 1.0 },
    );
    if !c.tie_word_embeddings {
        let std = 2.0 / (h as f64).sqrt();
        add("lm_head.weight".into(), vec![v, h], Init::Normal { std });
    }
    add(format!("{prefix}norm.weight"), vec![h], ZERO_CENTRED_NORM);

    for (l, kind) in c.layer_kinds.iter().enumerate() {
        let p = |s: &str| format!("{prefix}layers.{l}.{s}");
        add(p("input_layernorm.weight"), vec![h], ZERO_CENTRED_NORM);
        add(
            p("post_attention_layernorm.weight"),
            vec![h],
            ZERO_CENTRED_NORM,
        );
        match kind {
            LayerKind::LinearAttention => {
                let (nv, dv, k) = (
                    c.linear_num_value_heads,
                    c.linear_value_head_dim,
                    c.linear_conv_kernel,
                );
                let la = |s: &str| p(&format!("linear_attn.{s}"));
                match c.family {
                    Family::Qwen3Next => {
                        add(
                            la("in_proj_qkvz.weight"),
                            vec![2 * c.key_dim() + 2 * c.value_dim(), h],
                            fan_in(h),
                        );
                        add(la("in_proj_ba.weight"), vec![2 * nv, h], fan_in(h));
                    }
                    Family::Qwen35Moe => {
                        add(la("in_proj_qkv.weight"), vec![c.conv_dim(), h], fan_in(h));
                        add(la("in_proj_z.weight"), vec![c.value_dim(), h], fan_in(h));
                        add(la("in_proj_b.weight"), vec![nv, h], fan_in(h));
                        add(la("in_proj_a.weight"), vec![nv, h], fan_in(h));
                    }
                }
                add(la("conv1d.weight"), vec![c.conv_dim(), 1, k], fan_in(k));
                add(la("dt_bias"), vec![nv], Init::Uniform { lo: -1.5, hi: 1.0 });
                add(la("A_log"), vec![nv], Init::ALog);
                add(
                    la("norm.weight"),
                    vec![dv],
                    Init::Uniform { lo: 0.6, hi: 1.4 },
                );
                add(
                    la("out_proj.weight"),
                    vec![h, c.value_dim()],
                    fan_in(c.value_dim()),
                );
            }
            LayerKind::FullAttention => {
                let sa = |s: &str| p(&format!("self_attn.{s}"));
                add(sa("q_proj.weight"), vec![c.q_proj_rows(), h], fan_in(h));
                add(sa("k_proj.weight"), vec![c.kv_dim(), h], fan_in(h));
                add(sa("v_proj.weight"), vec![c.kv_dim(), h], fan_in(h));
                add(
                    sa("o_proj.weight"),
                    vec![h, c.attn_output_dim()],
                    fan_in(c.attn_output_dim()),
                );
                add(sa("q_norm.weight"), vec![c.head_dim], ZERO_CENTRED_NORM);
                add(sa("k_norm.weight"), vec![c.head_dim], ZERO_CENTRED_NORM);
            }
        }
        let (e, i, is) = (
            c.num_experts,
            c.moe_intermediate_size,
            c.shared_expert_intermediate_size,
        );
        add(p("mlp.gate.weight"), vec![e, h], sharp);
        add(
            p("mlp.shared_expert.gate_proj.weight"),
            vec![is, h],
            fan_in(h),
        );
        add(
            p("mlp.shared_expert.up_proj.weight"),
            vec![is, h],
            fan_in(h),
        );
        add(
            p("mlp.shared_expert.down_proj.weight"),
            vec![h, is],
            fan_in(is),
        );
        add(p("mlp.shared_expert_gate.weight"), vec![1, h], sharp);
        match c.family {
            Family::Qwen3Next => {
                for x in 0..e {
                    add(
                        p(&format!("mlp.experts.{x}.gate_proj.weight")),
                        vec![i, h],
                        fan_in(h),
                    );
                    add(
                        p(&format!("mlp.experts.{x}.up_proj.weight")),
                        vec![i, h],
                        fan_in(h),
                    );
                    add(
                        p(&format!("mlp.experts.{x}.down_proj.weight")),
                        vec![h, i],
                        fan_in(i),
                    );
                }
            }
            Family::Qwen35Moe => {
                add(p("mlp.experts.gate_up_proj"), vec![e, 2 * i, h], fan_in(h));
                add(p("mlp.experts.down_proj"), vec![e, h, i], fan_in(i));
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}
