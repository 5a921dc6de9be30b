//! [`ModelConfig`] → `config.json` in the fixtures' style (transformers 5 keys, sorted, plus the
//! older top-level `rope_theta` / `partial_rotary_factor` / `full_attention_interval` that the
//! released configs carry), so written models load here, in transformers and in other engines.
//!
//! Keys the config does not model (dropout, init range, router loss, the tiny vision tower) get
//! the values the fixtures have. The Qwen3.5 top-level vision token ids follow the
//! special-token convention of [`crate::presets`] (specials at the top of the vocabulary).

use serde_json::{Map, Value, json};

use super::{Family, ModelConfig};
use crate::presets;

/// The transformers release the fixtures were written with; tools read it for compatibility.
const TRANSFORMERS_VERSION: &str = "5.23.0";

pub(super) fn to_hf_json(c: &ModelConfig) -> Value {
    let mut text = text_keys(c);
    let config = match c.family {
        Family::Qwen3Next => {
            text.insert("architectures".into(), json!(["Qwen3NextForCausalLM"]));
            text.insert("model_type".into(), json!("qwen3_next"));
            text.insert("norm_topk_prob".into(), json!(c.norm_topk_prob));
            text.insert("decoder_sparse_step".into(), json!(1));
            text.insert("mlp_only_layers".into(), json!([]));
            // Dense-MLP width; unused because every layer is MoE (the fixtures use 4 H).
            text.insert("intermediate_size".into(), json!(4 * c.hidden_size));
            text.insert("transformers_version".into(), json!(TRANSFORMERS_VERSION));
            Value::Object(text)
        }
        Family::Qwen35Moe => {
            text.insert("model_type".into(), json!("qwen3_5_moe_text"));
            text.insert("attn_output_gate".into(), json!(true));
            text.insert("mamba_ssm_dtype".into(), json!("float32"));
            text.insert("mtp_num_hidden_layers".into(), json!(0));
            text.insert("mtp_use_dedicated_embeddings".into(), json!(false));
            if let Some(Value::Object(rope)) = text.get_mut("rope_parameters") {
                rope.insert("mrope_section".into(), json!(mrope_sections(c.rotary_dim)));
                rope.insert("mrope_interleaved".into(), json!(true));
            }
            let id = |token: &str| presets::special_token_id(c.family, c.vocab_size, token);
            json!({
                "architectures": ["Qwen3_5MoeForConditionalGeneration"],
                "dtype": "bfloat16",
                "image_token_id": id("<|image_pad|>"),
                "model_type": "qwen3_5_moe",
                "text_config": Value::Object(text),
                "tie_word_embeddings": c.tie_word_embeddings,
                "transformers_version": TRANSFORMERS_VERSION,
                "video_token_id": id("<|video_pad|>"),
                "vision_config": vision_config(c.hidden_size),
                "vision_end_token_id": id("<|vision_end|>"),
                "vision_start_token_id": id("<|vision_start|>"),
            })
        }
    };
    sort_keys(config)
}

/// The keys both families share (flat for Qwen3-Next, `text_config` for Qwen3.5).
fn text_keys(c: &ModelConfig) -> Map<String, Value> {
    let partial = c.rotary_dim as f64 / c.head_dim as f64;
    let eos = match c.eos_token_ids.as_slice() {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    let keys = json!({
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": c.bos_token_id,
        "dtype": "bfloat16",
        "eos_token_id": eos,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "layer_types": c.layer_kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
        "linear_conv_kernel_dim": c.linear_conv_kernel,
        "linear_key_head_dim": c.linear_key_head_dim,
        "linear_num_key_heads": c.linear_num_key_heads,
        "linear_num_value_heads": c.linear_num_value_heads,
        "linear_value_head_dim": c.linear_value_head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "moe_intermediate_size": c.moe_intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_experts": c.num_experts,
        "num_experts_per_tok": c.num_experts_per_tok,
        "num_hidden_layers": c.num_layers,
        "num_key_value_heads": c.num_kv_heads,
        "output_router_logits": false,
        "pad_token_id": null,
        "partial_rotary_factor": partial,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": {
            "partial_rotary_factor": partial,
            "rope_theta": c.rope_theta,
            "rope_type": "default",
        },
        "rope_theta": c.rope_theta,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": c.shared_expert_intermediate_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "use_cache": true,
        "vocab_size": c.vocab_size,
    });
    let Value::Object(mut map) = keys else {
        return Map::new();
    };
    if let (Some(y), Some(Value::Object(rope))) = (&c.yarn, map.get_mut("rope_parameters")) {
        rope.insert("rope_type".into(), json!("yarn"));
        rope.insert("factor".into(), json!(y.factor));
        rope.insert(
            "original_max_position_embeddings".into(),
            json!(y.original_max_position_embeddings),
        );
        rope.insert("beta_fast".into(), json!(y.beta_fast));
        rope.insert("beta_slow".into(), json!(y.beta_slow));
        rope.insert("attention_factor".into(), json!(y.attention_factor));
        rope.insert("truncate".into(), json!(y.truncate));
    }
    if let Some(interval) = c.full_attention_interval() {
        map.insert("full_attention_interval".into(), json!(interval));
    }
    map
}

/// How the release splits the rotary frequencies into (t, h, w) sections (32 → 11, 11, 10).
pub(crate) fn mrope_sections(rotary_dim: usize) -> [usize; 3] {
    let n = rotary_dim / 2;
    let (base, rem) = (n / 3, n % 3);
    [
        base + usize::from(rem > 0),
        base + usize::from(rem > 1),
        base,
    ]
}

/// A minimal vision tower description, so the file has the release's top-level structure.
fn vision_config(hidden_size: usize) -> Value {
    json!({
        "depth": 1,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 16,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 32,
        "model_type": "qwen3_5_moe_vision",
        "num_heads": 2,
        "num_position_embeddings": 16,
        "out_hidden_size": hidden_size,
        "patch_size": 4,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"},
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    })
}

/// Recursively orders object keys, as Python's `json.dumps(sort_keys=True)` does.
fn sort_keys(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_keys(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sort_keys).collect()),
        other => other,
    }
}
