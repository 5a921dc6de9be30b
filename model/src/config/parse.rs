//! `config.json` → [`ModelConfig`] (spec §1.1): where the text keys live, the two RoPE
//! spellings, `layer_types` versus `full_attention_interval`, and the Qwen3-Next MoE-layer keys.

use std::path::Path;

use serde_json::Value;

use super::json::Section;
use super::{ConfigError, Family, LayerKind, ModelConfig, Yarn};

const DEFAULT_PARTIAL_ROTARY_FACTOR: f64 = 0.25;
const DEFAULT_FULL_ATTENTION_INTERVAL: usize = 4;
const DEFAULT_RMS_NORM_EPS: f64 = 1e-6;

/// More decoder layers than any model of this family has (the largest has 60).
const MAX_LAYERS: usize = 1024;

pub(super) fn parse(text: &str, origin: &Path) -> Result<ModelConfig, ConfigError> {
    let root: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
        path: origin.to_path_buf(),
        source,
    })?;
    let Value::Object(top) = &root else {
        return Err(ConfigError::InvalidValue {
            path: origin.to_path_buf(),
            key: "<top level>".into(),
            reason: "expected a JSON object".into(),
        });
    };
    let top = Section::new(top, "", origin);
    let text = top
        .opt_object("text_config")?
        .unwrap_or_else(|| top.clone());
    let family = family(&top, &text)?;

    let num_layers = text.req_usize("num_hidden_layers")?;
    // Checked before anything is sized by it: per-layer lists are built right below.
    if num_layers == 0 || num_layers > MAX_LAYERS {
        return Err(text.invalid(
            "num_hidden_layers",
            format!("must be between 1 and {MAX_LAYERS}, found {num_layers}"),
        ));
    }
    let head_dim = text.req_usize("head_dim")?;
    let rope = rope(&text, head_dim)?;
    let layer_kinds = layer_kinds(&text, num_layers)?;
    check_all_layers_moe(&text, num_layers)?;

    // Token ids and tying may sit in text_config or (image-text release) at the top level.
    let bos_token_id = match text.opt_u32("bos_token_id")? {
        Some(id) => Some(id),
        None => top.opt_u32("bos_token_id")?,
    };
    let eos_token_ids = match text.opt_u32_list("eos_token_id")? {
        Some(ids) => ids,
        None => top.opt_u32_list("eos_token_id")?.unwrap_or_default(),
    };
    let tie_word_embeddings = match text.opt_bool("tie_word_embeddings")? {
        Some(t) => t,
        None => top.opt_bool("tie_word_embeddings")?.unwrap_or(false),
    };
    let norm_topk_prob = match family {
        Family::Qwen3Next => text.opt_bool("norm_topk_prob")?.unwrap_or(true),
        // Qwen3.5 has no such key and always renormalises.
        Family::Qwen35Moe => true,
    };

    let config = ModelConfig {
        family,
        vocab_size: text.req_usize("vocab_size")?,
        hidden_size: text.req_usize("hidden_size")?,
        num_layers,
        layer_kinds,
        num_attention_heads: text.req_usize("num_attention_heads")?,
        num_kv_heads: text.req_usize("num_key_value_heads")?,
        head_dim,
        rotary_dim: rope.rotary_dim,
        rope_theta: rope.theta,
        yarn: rope.yarn,
        linear_num_key_heads: text.req_usize("linear_num_key_heads")?,
        linear_num_value_heads: text.req_usize("linear_num_value_heads")?,
        linear_key_head_dim: text.req_usize("linear_key_head_dim")?,
        linear_value_head_dim: text.req_usize("linear_value_head_dim")?,
        linear_conv_kernel: text.req_usize("linear_conv_kernel_dim")?,
        num_experts: text.req_usize("num_experts")?,
        num_experts_per_tok: text.req_usize("num_experts_per_tok")?,
        moe_intermediate_size: text.req_usize("moe_intermediate_size")?,
        shared_expert_intermediate_size: text.req_usize("shared_expert_intermediate_size")?,
        norm_topk_prob,
        rms_norm_eps: text
            .opt_f64("rms_norm_eps")?
            .unwrap_or(DEFAULT_RMS_NORM_EPS),
        max_position_embeddings: text.req_usize("max_position_embeddings")?,
        tie_word_embeddings,
        bos_token_id,
        eos_token_ids,
    };
    config.validate_at(origin, text.prefix())?;
    Ok(config)
}

fn family(top: &Section<'_>, text: &Section<'_>) -> Result<Family, ConfigError> {
    let (section, value) = match top.opt_str("model_type")? {
        Some(v) => (top, v),
        None => match text.opt_str("model_type")? {
            Some(v) => (text, v),
            None => return Err(top.missing("model_type")),
        },
    };
    Family::from_model_type(value).ok_or_else(|| ConfigError::UnknownModelType {
        path: section.path().to_path_buf(),
        key: section.key("model_type"),
        value: value.to_string(),
    })
}

struct Rope {
    theta: f64,
    rotary_dim: usize,
    yarn: Option<Yarn>,
}

/// RoPE settings from `rope_parameters` (transformers 5) or the older top-level
/// `rope_theta` / `partial_rotary_factor` / `rope_scaling`; the dict wins where both exist.
fn rope(text: &Section<'_>, head_dim: usize) -> Result<Rope, ConfigError> {
    let params = text.opt_object("rope_parameters")?;
    let scaling = text.opt_object("rope_scaling")?;
    let mut yarn_section = None;
    for section in params.iter().chain(scaling.iter()) {
        let key = if section.has("rope_type") {
            "rope_type"
        } else {
            "type"
        };
        match section.opt_str(key)? {
            // "mrope" (older multimodal spelling) is plain partial RoPE for text-only input.
            None | Some("default" | "mrope") => {}
            Some("yarn") => yarn_section = Some(section),
            Some(kind) => {
                return Err(section.unsupported(
                    key,
                    format!("RoPE type `{kind}` is not implemented (default RoPE and YaRN are)"),
                ));
            }
        }
    }

    let theta = match agreed(params.as_ref(), text, "rope_theta")? {
        Some(t) => t,
        None => {
            return Err(match &params {
                Some(p) => p.missing("rope_theta"),
                None => text.missing("rope_theta"),
            });
        }
    };
    let factor_section = match &params {
        Some(p) if p.has("partial_rotary_factor") => p,
        _ => text,
    };
    let factor = agreed(params.as_ref(), text, "partial_rotary_factor")?;
    let factor = factor.unwrap_or(DEFAULT_PARTIAL_ROTARY_FACTOR);
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(factor_section.invalid(
            "partial_rotary_factor",
            format!("must be in (0, 1], found {factor}"),
        ));
    }
    let dims = head_dim as f64 * factor;
    if dims.fract() != 0.0 {
        return Err(factor_section.invalid(
            "partial_rotary_factor",
            format!("head_dim {head_dim} x {factor} is not a whole number of rotary dims"),
        ));
    }
    let yarn = yarn_section.map(|s| yarn(s, text)).transpose()?;
    Ok(Rope {
        theta,
        rotary_dim: dims as usize,
        yarn,
    })
}

/// The YaRN settings of a `rope_type: "yarn"` section; `original_max_position_embeddings`
/// defaults to the model's `max_position_embeddings`, as transformers reads it.
fn yarn(section: &Section<'_>, text: &Section<'_>) -> Result<Yarn, ConfigError> {
    let original = match section.opt_usize("original_max_position_embeddings")? {
        Some(n) => n,
        None => text.req_usize("max_position_embeddings")?,
    };
    if original == 0 {
        return Err(section.invalid("original_max_position_embeddings", "must be positive"));
    }
    // Without `factor`, the ratio of the context to the trained one (as transformers does).
    let factor = match section.opt_f64("factor")? {
        Some(f) => f,
        None => text.req_usize("max_position_embeddings")? as f64 / original as f64,
    };
    if !(factor.is_finite() && factor > 0.0) {
        return Err(section.invalid("factor", format!("must be positive, found {factor}")));
    }
    // 0 or absent: the paper's defaults (transformers reads them with `or`).
    let beta_fast = section
        .opt_f64("beta_fast")?
        .filter(|b| *b != 0.0)
        .unwrap_or(32.0);
    let beta_slow = section
        .opt_f64("beta_slow")?
        .filter(|b| *b != 0.0)
        .unwrap_or(1.0);
    if !(beta_fast.is_finite() && beta_slow.is_finite() && beta_fast > 0.0 && beta_slow > 0.0) {
        return Err(section.invalid("beta_fast", "beta_fast and beta_slow must be positive"));
    }
    // `0.1 · m · ln(factor) + 1`, or 1 when the factor does not extend the context.
    let mscale = |m: f64| {
        if factor <= 1.0 {
            1.0
        } else {
            0.1 * m * factor.ln() + 1.0
        }
    };
    let attention_factor = match section.opt_f64("attention_factor")? {
        Some(a) if a.is_finite() && a > 0.0 => a,
        Some(a) => {
            return Err(section.invalid("attention_factor", format!("must be positive, found {a}")));
        }
        None => match (
            section.opt_f64("mscale")?.filter(|m| *m != 0.0),
            section.opt_f64("mscale_all_dim")?.filter(|m| *m != 0.0),
        ) {
            (Some(m), Some(all)) => mscale(m) / mscale(all),
            _ => mscale(1.0),
        },
    };
    let truncate = section.opt_bool("truncate")?.unwrap_or(true);
    Ok(Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast,
        beta_slow,
        attention_factor,
        truncate,
    })
}

/// A RoPE number from `rope_parameters` or the legacy top-level key; where both exist they
/// must agree, since it is not clear which one a given engine would read.
fn agreed(
    params: Option<&Section<'_>>,
    text: &Section<'_>,
    key: &str,
) -> Result<Option<f64>, ConfigError> {
    let new = params.map(|p| p.opt_f64(key)).transpose()?.flatten();
    let old = text.opt_f64(key)?;
    match (new, old, params) {
        (Some(a), Some(b), Some(p)) if a != b => Err(ConfigError::Inconsistent {
            path: text.path().to_path_buf(),
            keys: format!("{}`, `{}", p.key(key), text.key(key)),
            reason: format!("{a} and {b} disagree"),
        }),
        _ => Ok(new.or(old)),
    }
}

fn layer_kinds(text: &Section<'_>, num_layers: usize) -> Result<Vec<LayerKind>, ConfigError> {
    if let Some(list) = text.opt_array("layer_types")? {
        return list
            .iter()
            .enumerate()
            .map(|(i, v)| match v.as_str() {
                Some("linear_attention") => Ok(LayerKind::LinearAttention),
                Some("full_attention") => Ok(LayerKind::FullAttention),
                _ => Err(text.invalid(
                    &format!("layer_types[{i}]"),
                    format!("expected \"linear_attention\" or \"full_attention\", found {v}"),
                )),
            })
            .collect();
    }
    let interval = text
        .opt_usize("full_attention_interval")?
        .unwrap_or(DEFAULT_FULL_ATTENTION_INTERVAL);
    if interval == 0 {
        return Err(text.invalid("full_attention_interval", "must be at least 1"));
    }
    Ok((0..num_layers)
        .map(|i| {
            if (i + 1) % interval == 0 {
                LayerKind::FullAttention
            } else {
                LayerKind::LinearAttention
            }
        })
        .collect())
}

/// Qwen3-Next can in principle make some layers dense; we only serve all-MoE models.
fn check_all_layers_moe(text: &Section<'_>, num_layers: usize) -> Result<(), ConfigError> {
    let step = text.opt_usize("decoder_sparse_step")?.unwrap_or(1);
    if step == 0 {
        return Err(text.invalid("decoder_sparse_step", "must be at least 1"));
    }
    if let Some(layer) = (0..num_layers).find(|i| (i + 1) % step != 0) {
        return Err(text.unsupported(
            "decoder_sparse_step",
            format!(
                "{step} makes layer {layer} a dense MLP layer; only all-MoE models are supported"
            ),
        ));
    }
    if let Some(list) = text.opt_array("mlp_only_layers")?
        && let Some(first) = list.first()
    {
        return Err(text.unsupported(
            "mlp_only_layers",
            format!("layer {first} is a dense MLP layer; only all-MoE models are supported"),
        ));
    }
    Ok(())
}
