//! Config parsing against the fixtures, presets, round trips, and every rejection rule.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{FIXTURES, TempDir, fixture, read_json};
use myriad_model::config::{ConfigError, Family, GenerationConfig, LayerKind, ModelConfig, Yarn};
use myriad_model::presets::{self, Preset};
use serde_json::{Value, json};

fn preset_of(fixture_name: &str) -> (Family, Preset) {
    let (arch, preset) = fixture_name.split_once('-').unwrap();
    let family = Family::from_model_type(arch).unwrap();
    (family, Preset::parse(preset).unwrap())
}

#[test]
fn fixture_configs_match_reference_shapes() {
    for name in FIXTURES {
        let dir = fixture(name);
        let c = ModelConfig::from_dir(&dir).unwrap();
        let r = read_json(&dir.join("reference.json"));
        let s = &r["shape"];
        let u = |k: &str| s[k].as_u64().unwrap() as usize;
        assert_eq!(c.vocab_size, u("vocab_size"), "{name}");
        assert_eq!(c.hidden_size, u("hidden_size"));
        assert_eq!(c.num_layers, u("num_hidden_layers"));
        assert_eq!(c.num_attention_heads, u("num_attention_heads"));
        assert_eq!(c.num_kv_heads, u("num_key_value_heads"));
        assert_eq!(c.head_dim, u("head_dim"));
        let factor = s["partial_rotary_factor"].as_f64().unwrap();
        assert_eq!(c.rotary_dim, (c.head_dim as f64 * factor) as usize);
        assert_eq!(c.rope_theta, s["rope_theta"].as_f64().unwrap());
        assert_eq!(c.linear_num_key_heads, u("linear_num_key_heads"));
        assert_eq!(c.linear_num_value_heads, u("linear_num_value_heads"));
        assert_eq!(c.linear_key_head_dim, u("linear_key_head_dim"));
        assert_eq!(c.linear_value_head_dim, u("linear_value_head_dim"));
        assert_eq!(c.linear_conv_kernel, u("linear_conv_kernel_dim"));
        assert_eq!(c.num_experts, u("num_experts"));
        assert_eq!(c.num_experts_per_tok, u("num_experts_per_tok"));
        assert_eq!(c.moe_intermediate_size, u("moe_intermediate_size"));
        assert_eq!(
            c.shared_expert_intermediate_size,
            u("shared_expert_intermediate_size")
        );
        let kinds: Vec<&str> = c.layer_kinds.iter().map(|k| k.as_str()).collect();
        let expected: Vec<&str> = r["layer_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(kinds, expected);
        assert_eq!(
            c.full_attention_interval(),
            Some(u("full_attention_interval"))
        );
        assert!(c.norm_topk_prob);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.max_position_embeddings, 4096);
        let ids = &r["special_token_ids"];
        let id = |t: &str| ids[t].as_u64().unwrap() as u32;
        assert_eq!(c.bos_token_id, Some(id("<|endoftext|>")));
        assert_eq!(c.eos_token_ids, vec![id("<|im_end|>")]);
        assert_eq!(c.num_linear_layers(), 3);
        assert_eq!(c.num_full_layers(), 1);
        assert_eq!(c.ordinal_in_kind(3), Some(0));
        assert_eq!(c.ordinal_in_kind(2), Some(2));
        // The fixtures' own special-token table agrees with the presets' convention.
        let (family, _) = preset_of(name);
        assert_eq!(c.family, family);
        for (i, tok) in presets::special_tokens(family).iter().enumerate() {
            assert_eq!(
                id(tok) as usize,
                c.vocab_size - presets::special_tokens(family).len() + i
            );
            assert_eq!(
                presets::special_token_id(family, c.vocab_size, tok),
                Some(id(tok))
            );
        }
        assert_eq!(
            ids.as_object().unwrap().len(),
            presets::special_tokens(family).len()
        );
    }
}

#[test]
fn qwen3_next_parameter_count_matches_reference() {
    // The Qwen3-Next fixtures have no vision tower, so the text count is the whole count.
    for name in ["qwen3_next-tiny", "qwen3_next-mini512"] {
        let c = ModelConfig::from_dir(&fixture(name)).unwrap();
        let r = read_json(&fixture(name).join("reference.json"));
        assert_eq!(
            c.num_parameters() as u64,
            r["num_parameters"].as_u64().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn presets_equal_fixture_configs() {
    for name in FIXTURES {
        let parsed = ModelConfig::from_dir(&fixture(name)).unwrap();
        let (family, preset) = preset_of(name);
        assert_eq!(preset.config(family), parsed, "{name}");
    }
}

#[test]
fn to_hf_json_reproduces_fixture_config_files() {
    for name in FIXTURES {
        let (family, preset) = preset_of(name);
        let written = preset.config(family).to_hf_json();
        let file = read_json(&fixture(name).join("config.json"));
        assert_eq!(written, file, "{name}");
    }
}

#[test]
fn to_hf_json_round_trips() {
    let origin = Path::new("/roundtrip/config.json");
    for family in Family::ALL {
        for preset in Preset::ALL {
            let c = preset.config(family);
            c.validate().unwrap();
            let text = serde_json::to_string_pretty(&c.to_hf_json()).unwrap();
            assert_eq!(
                ModelConfig::from_json_str(&text, origin).unwrap(),
                c,
                "{preset:?} {family:?}"
            );
        }
        // Less regular values survive too.
        let mut c = Preset::Tiny.config(family);
        c.eos_token_ids = vec![1, 2, 3];
        c.bos_token_id = None;
        c.tie_word_embeddings = true;
        c.rms_norm_eps = 1e-5;
        c.rope_theta = 123456.5;
        c.layer_kinds = vec![
            LayerKind::FullAttention,
            LayerKind::LinearAttention,
            LayerKind::FullAttention,
            LayerKind::LinearAttention,
        ];
        let text = c.to_hf_json().to_string();
        assert_eq!(ModelConfig::from_json_str(&text, origin).unwrap(), c);
        // And YaRN.
        c.yarn = Some(Yarn {
            factor: 4.0,
            original_max_position_embeddings: 1024,
            beta_fast: 24.0,
            beta_slow: 2.0,
            attention_factor: 1.25,
            truncate: false,
        });
        let text = c.to_hf_json().to_string();
        assert_eq!(ModelConfig::from_json_str(&text, origin).unwrap(), c);
    }
}

#[test]
fn bench_preset_shape() {
    let c = Preset::Bench.config(Family::Qwen35Moe);
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.num_layers),
        (32768, 1024, 8)
    );
    assert_eq!((c.num_linear_layers(), c.num_full_layers()), (6, 2));
    assert_eq!(
        (
            c.num_attention_heads,
            c.num_kv_heads,
            c.head_dim,
            c.rotary_dim
        ),
        (8, 2, 128, 32)
    );
    assert_eq!(
        (
            c.linear_num_key_heads,
            c.linear_num_value_heads,
            c.linear_key_head_dim,
            c.linear_value_head_dim
        ),
        (8, 16, 64, 64)
    );
    assert_eq!(
        (
            c.num_experts,
            c.num_experts_per_tok,
            c.moe_intermediate_size,
            c.shared_expert_intermediate_size
        ),
        (512, 10, 256, 256)
    );
    assert_eq!(c.rope_theta, 1e7);
    assert_eq!(c.max_position_embeddings, 32768);
    // "3.33 G parameters" in the fixtures README.
    let n = c.num_parameters();
    assert!((3_300_000_000..3_400_000_000).contains(&n), "{n}");
    assert_eq!(Preset::parse("bench"), Some(Preset::Bench));
    assert_eq!(Preset::parse("huge"), None);
    for p in Preset::ALL {
        assert_eq!(Preset::parse(p.name()), Some(p));
    }
}

#[test]
fn derived_sizes() {
    let c = Preset::Tiny.config(Family::Qwen3Next);
    assert_eq!(c.key_dim(), 32);
    assert_eq!(c.value_dim(), 64);
    assert_eq!(c.conv_dim(), 128);
    assert_eq!(c.value_heads_per_key_head(), 2);
    assert_eq!(c.query_heads_per_kv_head(), 2);
    assert_eq!(c.q_proj_rows(), 256);
    assert_eq!(c.kv_dim(), 64);
}

// ------------------------------------------------------------------------------------------
// Alternative spellings
// ------------------------------------------------------------------------------------------

fn fixture_json(name: &str) -> Value {
    read_json(&fixture(name).join("config.json"))
}

const ORIGIN: &str = "/models/broken/config.json";

fn parse(v: &Value) -> Result<ModelConfig, ConfigError> {
    ModelConfig::from_json_str(&v.to_string(), Path::new(ORIGIN))
}

/// The object holding the text keys of a fixture config.
fn text_mut(v: &mut Value) -> &mut serde_json::Map<String, Value> {
    if v.get("text_config").is_some() {
        v["text_config"].as_object_mut().unwrap()
    } else {
        v.as_object_mut().unwrap()
    }
}

#[test]
fn rope_keys_in_either_place() {
    for name in ["qwen3_next-tiny", "qwen3_5_moe-tiny"] {
        let base = parse(&fixture_json(name)).unwrap();
        // Only the old top-level keys.
        let mut old = fixture_json(name);
        text_mut(&mut old).remove("rope_parameters");
        text_mut(&mut old).insert("rope_scaling".into(), Value::Null);
        assert_eq!(parse(&old).unwrap(), base);
        // Only the rope_parameters dict.
        let mut new = fixture_json(name);
        text_mut(&mut new).remove("rope_theta");
        text_mut(&mut new).remove("partial_rotary_factor");
        assert_eq!(parse(&new).unwrap(), base);
        // No partial factor anywhere: default 0.25.
        let mut none = fixture_json(name);
        text_mut(&mut none).remove("partial_rotary_factor");
        text_mut(&mut none)["rope_parameters"]
            .as_object_mut()
            .unwrap()
            .remove("partial_rotary_factor");
        assert_eq!(parse(&none).unwrap().rotary_dim, base.head_dim / 4);
    }
}

#[test]
fn layer_pattern_from_interval() {
    let mut v = fixture_json("qwen3_next-tiny");
    text_mut(&mut v).remove("layer_types");
    text_mut(&mut v).insert("full_attention_interval".into(), json!(2));
    let c = parse(&v).unwrap();
    assert_eq!(
        c.layer_kinds,
        vec![
            LayerKind::LinearAttention,
            LayerKind::FullAttention,
            LayerKind::LinearAttention,
            LayerKind::FullAttention
        ]
    );
    // Neither key: default interval 4.
    text_mut(&mut v).remove("full_attention_interval");
    assert_eq!(
        parse(&v).unwrap().layer_kinds,
        Preset::Tiny.config(Family::Qwen3Next).layer_kinds
    );
}

#[test]
fn text_only_qwen3_5_flat_config() {
    // A text-only conversion: the text_config keys at the top level, model_type qwen3_5_moe_text.
    let v = fixture_json("qwen3_5_moe-tiny");
    let flat = v["text_config"].clone();
    let c = parse(&flat).unwrap();
    assert_eq!(c, Preset::Tiny.config(Family::Qwen35Moe));
}

#[test]
fn eos_list_and_missing_ids() {
    let mut v = fixture_json("qwen3_next-tiny");
    text_mut(&mut v).insert("eos_token_id".into(), json!([1017, 1015]));
    text_mut(&mut v).remove("bos_token_id");
    let c = parse(&v).unwrap();
    assert_eq!(c.eos_token_ids, vec![1017, 1015]);
    assert_eq!(c.bos_token_id, None);
}

// ------------------------------------------------------------------------------------------
// Rejections: every message names the file and the key
// ------------------------------------------------------------------------------------------

fn expect_error(v: &Value, keys: &[&str]) -> ConfigError {
    let err = parse(v).expect_err("config should be rejected");
    let msg = err.to_string();
    assert!(msg.contains(ORIGIN), "message lacks the file: {msg}");
    for key in keys {
        assert!(msg.contains(key), "message lacks `{key}`: {msg}");
    }
    assert_eq!(err.path(), Path::new(ORIGIN));
    err
}

fn mutated(name: &str, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut v = fixture_json(name);
    f(text_mut(&mut v));
    v
}

#[test]
fn missing_keys() {
    for key in [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "linear_key_head_dim",
        "linear_value_head_dim",
        "linear_conv_kernel_dim",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "max_position_embeddings",
    ] {
        let v = mutated("qwen3_next-tiny", |t| {
            t.remove(key);
        });
        let err = expect_error(&v, &[key]);
        assert!(matches!(err, ConfigError::MissingKey { .. }), "{err}");
        // Nested configs name the full path.
        let v = mutated("qwen3_5_moe-tiny", |t| {
            t.remove(key);
        });
        expect_error(&v, &[&format!("text_config.{key}")]);
    }
    let v = mutated("qwen3_next-tiny", |t| {
        t.remove("rope_theta");
        t.remove("rope_parameters");
    });
    expect_error(&v, &["rope_theta"]);
    let v = mutated("qwen3_next-tiny", |t| {
        t.remove("model_type");
    });
    expect_error(&v, &["model_type"]);
}

#[test]
fn unknown_model_type() {
    let v = mutated("qwen3_next-tiny", |t| {
        t.insert("model_type".into(), json!("llama"));
    });
    let err = expect_error(&v, &["model_type", "llama"]);
    assert!(matches!(err, ConfigError::UnknownModelType { .. }));
    let mut v = fixture_json("qwen3_5_moe-tiny");
    v["model_type"] = json!("qwen3_5");
    expect_error(&v, &["model_type", "qwen3_5"]);
}

type Mutation = dyn Fn(&mut serde_json::Map<String, Value>);

#[test]
fn inconsistent_sizes() {
    let cases: Vec<(Box<Mutation>, Vec<&str>)> = vec![
        (
            Box::new(|t| {
                t["layer_types"].as_array_mut().unwrap().pop();
            }),
            vec!["layer_types", "num_hidden_layers"],
        ),
        (
            Box::new(|t| t["num_attention_heads"] = json!(3)),
            vec!["num_attention_heads", "num_key_value_heads"],
        ),
        (
            Box::new(|t| t["linear_num_value_heads"] = json!(3)),
            vec!["linear_num_value_heads", "linear_num_key_heads"],
        ),
        (
            Box::new(|t| t["num_experts_per_tok"] = json!(0)),
            vec!["num_experts_per_tok"],
        ),
        (
            Box::new(|t| t["num_experts_per_tok"] = json!(65)),
            vec!["num_experts_per_tok", "num_experts"],
        ),
        (
            Box::new(|t| {
                // head_dim 32 × 1/32 = 1 rotary dim: odd.
                t["partial_rotary_factor"] = json!(0.03125);
                t["rope_parameters"]["partial_rotary_factor"] = json!(0.03125);
            }),
            vec!["partial_rotary_factor"],
        ),
        (
            Box::new(|t| t["rope_parameters"]["partial_rotary_factor"] = json!(1.5)),
            vec!["rope_parameters.partial_rotary_factor"],
        ),
        (
            Box::new(|t| t["rope_parameters"]["partial_rotary_factor"] = json!(0.3)),
            vec!["rope_parameters.partial_rotary_factor"],
        ),
        (
            Box::new(|t| t["hidden_size"] = json!(0)),
            vec!["hidden_size"],
        ),
        (
            Box::new(|t| t["num_experts"] = json!(0)),
            vec!["num_experts"],
        ),
        (
            Box::new(|t| t["hidden_size"] = json!(1u64 << 40)),
            vec!["hidden_size", "parameters"],
        ),
        (
            Box::new(|t| t["num_experts"] = json!(u64::MAX)),
            vec!["num_experts"],
        ),
        (
            Box::new(|t| t["linear_key_head_dim"] = json!(0)),
            vec!["linear_key_head_dim"],
        ),
        (
            Box::new(|t| t["hidden_size"] = json!("64")),
            vec!["hidden_size"],
        ),
        (
            Box::new(|t| t["hidden_size"] = json!(-1)),
            vec!["hidden_size"],
        ),
        (
            Box::new(|t| t["rms_norm_eps"] = json!(0.0)),
            vec!["rms_norm_eps"],
        ),
        (
            Box::new(|t| {
                t["rope_theta"] = json!(-5.0);
                t["rope_parameters"]["rope_theta"] = json!(-5.0);
            }),
            vec!["rope_theta"],
        ),
        // The two spellings must agree.
        (
            Box::new(|t| t["rope_theta"] = json!(5.0)),
            vec!["rope_theta", "rope_parameters.rope_theta"],
        ),
        (
            Box::new(|t| t["partial_rotary_factor"] = json!(0.5)),
            vec![
                "partial_rotary_factor",
                "rope_parameters.partial_rotary_factor",
            ],
        ),
        (
            Box::new(|t| t["eos_token_id"] = json!(5000)),
            vec!["eos_token_id", "vocab_size"],
        ),
        (
            Box::new(|t| t["bos_token_id"] = json!(1024)),
            vec!["bos_token_id", "vocab_size"],
        ),
        (
            Box::new(|t| t["layer_types"][1] = json!("sliding_attention")),
            vec!["layer_types[1]"],
        ),
        (
            Box::new(|t| {
                t.remove("layer_types");
                t["full_attention_interval"] = json!(0);
            }),
            vec!["full_attention_interval"],
        ),
    ];
    for (i, (mutate, keys)) in cases.iter().enumerate() {
        let v = mutated("qwen3_next-tiny", |t| mutate(t));
        let err = parse(&v).expect_err(&format!("case {i} should be rejected"));
        let msg = err.to_string();
        assert!(msg.contains(ORIGIN), "case {i}: {msg}");
        for key in keys {
            assert!(msg.contains(key), "case {i} lacks `{key}`: {msg}");
        }
        // Same rule inside text_config, with the nested key name.
        let v = mutated("qwen3_5_moe-tiny", |t| mutate(t));
        let msg = parse(&v)
            .expect_err(&format!("nested case {i}"))
            .to_string();
        assert!(msg.contains("text_config."), "nested case {i}: {msg}");
    }
}

#[test]
fn yarn_in_either_family_and_spelling() {
    // transformers 5 spelling, Qwen3.5 (text_config).
    let v = mutated("qwen3_5_moe-tiny", |t| {
        t["rope_parameters"]["rope_type"] = json!("yarn");
        t["rope_parameters"]["factor"] = json!(4.0);
        t["rope_parameters"]["original_max_position_embeddings"] = json!(1024);
    });
    let y = parse(&v).unwrap().yarn.expect("YaRN on");
    assert_eq!(
        (
            y.factor,
            y.original_max_position_embeddings,
            y.beta_fast,
            y.beta_slow,
            y.truncate
        ),
        (4.0, 1024, 32.0, 1.0, true)
    );
    assert!((y.attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
    // The older `rope_scaling` spelling, Qwen3-Next; no original context: the model's, and
    // explicit settings win over the defaults.
    let v = mutated("qwen3_next-tiny", |t| {
        t.remove("rope_parameters");
        t.insert(
            "rope_scaling".into(),
            json!({"type": "yarn", "factor": 2.0, "beta_fast": 16, "attention_factor": 1.5,
                   "truncate": false}),
        );
    });
    let c = parse(&v).unwrap();
    let y = c.yarn.expect("YaRN on");
    assert_eq!(
        y.original_max_position_embeddings,
        c.max_position_embeddings
    );
    assert_eq!(
        (y.beta_fast, y.attention_factor, y.truncate),
        (16.0, 1.5, false)
    );
    // No factor: the ratio of the context to the trained one, as transformers takes it.
    let v = mutated("qwen3_5_moe-tiny", |t| {
        t["rope_parameters"]["rope_type"] = json!("yarn");
        t["rope_parameters"]["original_max_position_embeddings"] = json!(1024);
    });
    assert_eq!(parse(&v).unwrap().yarn.map(|y| y.factor), Some(4.0));
    // DeepSeek's mscale pair sets the attention factor.
    let v = mutated("qwen3_5_moe-tiny", |t| {
        t["rope_parameters"]["rope_type"] = json!("yarn");
        t["rope_parameters"]["factor"] = json!(4.0);
        t["rope_parameters"]["mscale"] = json!(2.0);
        t["rope_parameters"]["mscale_all_dim"] = json!(1.0);
    });
    let a = parse(&v).unwrap().yarn.map(|y| y.attention_factor);
    let l = 4f64.ln();
    assert_eq!(a, Some((0.2 * l + 1.0) / (0.1 * l + 1.0)));
    // Bad values name the key.
    for (key, value) in [("factor", json!(-1.0)), ("attention_factor", json!(0.0))] {
        let v = mutated("qwen3_5_moe-tiny", |t| {
            t["rope_parameters"]["rope_type"] = json!("yarn");
            t["rope_parameters"]["factor"] = json!(4.0);
            t["rope_parameters"][key] = value;
        });
        expect_error(&v, &[&format!("rope_parameters.{key}")]);
    }
}

#[test]
fn unsupported_features() {
    let v = mutated("qwen3_5_moe-tiny", |t| {
        t["rope_parameters"]["rope_type"] = json!("longrope");
        t["rope_parameters"]["factor"] = json!(4.0);
    });
    let err = expect_error(&v, &["text_config.rope_parameters.rope_type", "longrope"]);
    assert!(matches!(err, ConfigError::Unsupported { .. }));
    let v = mutated("qwen3_next-tiny", |t| {
        t.remove("rope_parameters");
        t.insert(
            "rope_scaling".into(),
            json!({"type": "dynamic", "factor": 4.0}),
        );
    });
    expect_error(&v, &["rope_scaling.type", "dynamic"]);
    let v = mutated("qwen3_next-tiny", |t| t["mlp_only_layers"] = json!([1]));
    expect_error(&v, &["mlp_only_layers"]);
    let v = mutated("qwen3_next-tiny", |t| t["decoder_sparse_step"] = json!(2));
    expect_error(&v, &["decoder_sparse_step"]);
}

#[test]
fn malformed_and_missing_files() {
    let err = ModelConfig::from_json_str("{\"model_type\": ", Path::new(ORIGIN)).unwrap_err();
    assert!(matches!(err, ConfigError::Json { .. }));
    assert!(err.to_string().contains(ORIGIN));
    let err = ModelConfig::from_json_str("[1, 2]", Path::new(ORIGIN)).unwrap_err();
    assert!(err.to_string().contains(ORIGIN));

    let tmp = TempDir::new("cfg-missing");
    let err = ModelConfig::from_dir(tmp.path()).unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }));
    assert!(
        err.to_string()
            .contains(&tmp.path().join("config.json").display().to_string())
    );
}

#[test]
fn validate_names_keys_for_in_memory_configs() {
    let mut c = Preset::Tiny.config(Family::Qwen3Next);
    c.num_experts_per_tok = 100;
    let msg = c.validate().unwrap_err().to_string();
    assert!(msg.contains("num_experts_per_tok"), "{msg}");
}

// ------------------------------------------------------------------------------------------
// generation_config.json
// ------------------------------------------------------------------------------------------

#[test]
fn generation_config_of_fixtures() {
    for name in FIXTURES {
        let dir = fixture(name);
        let c = ModelConfig::from_dir(&dir).unwrap();
        let g = GenerationConfig::from_dir(&dir, &c).unwrap();
        let (family, _) = preset_of(name);
        let id = |t: &str| presets::special_token_id(family, c.vocab_size, t).unwrap();
        assert_eq!(g.eos_token_ids, vec![id("<|im_end|>"), id("<|endoftext|>")]);
        assert_eq!(g.bos_token_id, Some(id("<|endoftext|>")));
        assert_eq!(g.pad_token_id, Some(id("<|endoftext|>")));
        assert_eq!(g.do_sample, Some(true));
        assert_eq!(g.temperature, Some(0.7));
        assert_eq!(g.top_p, Some(0.8));
        assert_eq!(g.top_k, Some(20));
    }
}

#[test]
fn generation_config_missing_malformed_and_int_eos() {
    let model = Preset::Tiny.config(Family::Qwen3Next);
    let tmp = TempDir::new("gen");
    let g = GenerationConfig::from_dir(tmp.path(), &model).unwrap();
    assert_eq!(g.eos_token_ids, model.eos_token_ids);
    assert_eq!(g.bos_token_id, model.bos_token_id);
    assert_eq!(g.temperature, None);

    let path = tmp.path().join("generation_config.json");
    std::fs::write(&path, "{\"eos_token_id\": 7, \"top_k\": 5}").unwrap();
    let g = GenerationConfig::from_dir(tmp.path(), &model).unwrap();
    assert_eq!(g.eos_token_ids, vec![7]);
    assert_eq!(g.top_k, Some(5));
    assert_eq!(g.bos_token_id, model.bos_token_id);

    std::fs::write(&path, "{\"eos_token_id\": [7,").unwrap();
    let msg = GenerationConfig::from_dir(tmp.path(), &model)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");

    std::fs::write(&path, "{\"temperature\": \"hot\"}").unwrap();
    let msg = GenerationConfig::from_dir(tmp.path(), &model)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("temperature") && msg.contains(&path.display().to_string()),
        "{msg}"
    );
}

/// Regressions found by the `model_config` fuzz target.
#[test]
fn fuzz_findings_stay_fixed() {
    let text = std::fs::read_to_string(fixture("qwen3_next-mini512").join("config.json")).unwrap();
    let origin = Path::new("fuzz/config.json");
    // A layer count that would size gigabytes of per-layer lists is refused up front.
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["num_hidden_layers"] = json!(8_980_198_284u64);
    let e = ModelConfig::from_json_str(&v.to_string(), origin)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("num_hidden_layers") && e.contains("fuzz/config.json"),
        "{e}"
    );
    // Extreme floats survive the round trip through to_hf_json exactly.
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["rms_norm_eps"] = json!(1e-86);
    let c = ModelConfig::from_json_str(&v.to_string(), origin).unwrap();
    let again = ModelConfig::from_json_str(&c.to_hf_json().to_string(), origin).unwrap();
    assert_eq!(again, c);
}
