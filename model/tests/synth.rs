//! Synthetic models: layout identical to the fixtures, loadable, deterministic, streamed into
//! shards.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{FIXTURES, TempDir, fixture, read_all, read_json, weight_files};
use myriad_kernels::WeightDtype;
use myriad_model::checkpoint::{Checkpoint, MixerTensors};
use myriad_model::config::{Family, GenerationConfig, ModelConfig};
use myriad_model::presets::Preset;
use myriad_model::synth::{SynthSpec, write_random_model};
use safetensors::Dtype;

fn spec(
    family: Family,
    preset: Preset,
    seed: u64,
    dtype: WeightDtype,
    shard_bytes: u64,
) -> SynthSpec {
    SynthSpec {
        config: preset.config(family),
        seed,
        dtype,
        shard_bytes,
    }
}

fn load_everything(dir: &Path) -> (ModelConfig, usize) {
    let c = ModelConfig::from_dir(dir).unwrap();
    let ck = Checkpoint::open(dir, &c).unwrap();
    let mut loaded = 3;
    ck.embed_tokens().unwrap();
    ck.lm_head().unwrap();
    ck.final_norm().unwrap();
    for l in 0..c.num_layers {
        let t = ck.layer(l).unwrap();
        assert_eq!(t.router.shape, vec![c.num_experts, c.hidden_size]);
        loaded += 1;
        for e in 0..c.num_experts {
            let x = ck.expert(l, e).unwrap();
            assert_eq!(
                x.down_proj.shape,
                vec![c.hidden_size, c.moe_intermediate_size]
            );
            loaded += 1;
        }
    }
    (c, loaded)
}

#[test]
fn synthetic_models_have_the_fixture_layout() {
    for name in FIXTURES {
        let (arch, preset) = name.split_once('-').unwrap();
        let family = Family::from_model_type(arch).unwrap();
        let preset = Preset::parse(preset).unwrap();
        let tmp = TempDir::new("synth-layout");
        let report =
            write_random_model(tmp.path(), &spec(family, preset, 0, WeightDtype::BF16, 0)).unwrap();
        assert_eq!(
            report.num_parameters as usize,
            preset.config(family).num_parameters()
        );

        // Same tensor names, shapes and dtypes as the fixture (minus its vision tower).
        let ours = read_all(tmp.path());
        let theirs: BTreeMap<_, _> = read_all(&fixture(name))
            .into_iter()
            .filter(|(n, _)| !n.starts_with("model.visual."))
            .collect();
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (n, t) in &ours {
            assert_eq!(t.shape, theirs[n].shape, "{name} {n}");
            assert_eq!(t.dtype, theirs[n].dtype, "{name} {n}");
        }
        assert_eq!(report.num_tensors, ours.len());

        // Config files agree with the fixture's.
        assert_eq!(
            ModelConfig::from_dir(tmp.path()).unwrap(),
            ModelConfig::from_dir(&fixture(name)).unwrap()
        );
        assert_eq!(
            read_json(&tmp.path().join("config.json")),
            read_json(&fixture(name).join("config.json"))
        );
        let c = ModelConfig::from_dir(tmp.path()).unwrap();
        let mut ours_gen = read_json(&tmp.path().join("generation_config.json"));
        let mut theirs_gen = read_json(&fixture(name).join("generation_config.json"));
        ours_gen
            .as_object_mut()
            .unwrap()
            .remove("transformers_version");
        theirs_gen
            .as_object_mut()
            .unwrap()
            .remove("transformers_version");
        assert_eq!(ours_gen, theirs_gen, "{name}");
        assert_eq!(
            GenerationConfig::from_dir(tmp.path(), &c).unwrap(),
            GenerationConfig::from_dir(&fixture(name), &c).unwrap()
        );

        let (_, loaded) = load_everything(tmp.path());
        assert_eq!(loaded, 3 + c.num_layers * (1 + c.num_experts));
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_values() {
    let a = TempDir::new("synth-a");
    let b = TempDir::new("synth-b");
    let d = TempDir::new("synth-d");
    let s = spec(Family::Qwen35Moe, Preset::Tiny, 11, WeightDtype::BF16, 0);
    write_random_model(a.path(), &s).unwrap();
    write_random_model(b.path(), &s).unwrap();
    write_random_model(d.path(), &SynthSpec { seed: 12, ..s }).unwrap();
    for f in ["model.safetensors", "config.json", "generation_config.json"] {
        assert_eq!(
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap(),
            "{f}"
        );
    }
    let (ta, td) = (read_all(a.path()), read_all(d.path()));
    for (n, t) in &ta {
        assert_ne!(t.data, td[n].data, "{n} does not depend on the seed");
    }
    // Distinct tensors of the same shape get distinct values.
    let q = "model.language_model.layers.3.self_attn.k_proj.weight";
    let v = "model.language_model.layers.3.self_attn.v_proj.weight";
    assert_ne!(ta[q].data, ta[v].data);
}

#[test]
fn f32_storage_holds_bf16_values() {
    let tmp = TempDir::new("synth-f32");
    let bf = TempDir::new("synth-bf");
    write_random_model(
        tmp.path(),
        &spec(Family::Qwen3Next, Preset::Tiny, 3, WeightDtype::F32, 0),
    )
    .unwrap();
    write_random_model(
        bf.path(),
        &spec(Family::Qwen3Next, Preset::Tiny, 3, WeightDtype::BF16, 0),
    )
    .unwrap();
    let (f32s, bf16s) = (read_all(tmp.path()), read_all(bf.path()));
    for (n, t) in &f32s {
        assert_eq!(t.dtype, Dtype::F32, "{n}");
        if n.ends_with("A_log") {
            assert_eq!(t.data, bf16s[n].data);
            continue;
        }
        assert!(
            t.data.chunks_exact(4).all(|b| b[0] == 0 && b[1] == 0),
            "{n} holds values that are not bf16-representable"
        );
        assert_eq!(
            t.f32s(),
            bf16s[n].f32s(),
            "{n}: F32 and BF16 files hold different values"
        );
    }
    let cfg = read_json(&tmp.path().join("config.json"));
    assert_eq!(cfg["dtype"], "float32");
    let (_, loaded) = load_everything(tmp.path());
    assert!(loaded > 0);
}

fn stats(values: &[f32]) -> (f64, f64, f32, f32) {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let min = values.iter().copied().fold(f32::INFINITY, f32::min);
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (mean, var.sqrt(), min, max)
}

#[test]
fn weight_distributions_follow_the_fixtures() {
    let tmp = TempDir::new("synth-dist");
    write_random_model(
        tmp.path(),
        &spec(Family::Qwen35Moe, Preset::Mini512, 5, WeightDtype::BF16, 0),
    )
    .unwrap();
    let c = ModelConfig::from_dir(tmp.path()).unwrap();
    let ck = Checkpoint::open(tmp.path(), &c).unwrap();
    let h = c.hidden_size as f64;
    let close = |name: &str, got: f64, want: f64| {
        assert!(
            (got - want).abs() < 0.05 * want,
            "{name}: std {got}, want {want}"
        );
    };
    let (_, sd, _, _) = stats(&ck.embed_tokens().unwrap().to_f32());
    close("embed", sd, 1.0);
    let (_, sd, _, _) = stats(&ck.lm_head().unwrap().to_f32());
    close("lm_head", sd, 2.0 / h.sqrt());
    let (_, _, lo, hi) = stats(&ck.final_norm().unwrap().to_f32());
    assert!(lo >= -0.4 && hi <= 0.4);
    let layer = ck.layer(0).unwrap();
    let (_, sd, _, _) = stats(&layer.router.to_f32());
    close("router", sd, 1.5 / h.sqrt());
    let MixerTensors::Linear(m) = layer.mixer else {
        panic!("layer 0 is linear");
    };
    let (_, sd, _, _) = stats(&m.in_proj_qkv.to_f32());
    close("in_proj_qkv", sd, 1.0 / h.sqrt());
    let (_, sd, _, _) = stats(&m.conv1d.to_f32());
    close("conv1d", sd, 0.5);
    let (_, _, lo, hi) = stats(&m.norm.to_f32());
    assert!(lo >= 0.6 && hi <= 1.4);
    let (_, _, lo, hi) = stats(&m.dt_bias.to_f32());
    assert!(lo >= -1.5 && hi <= 1.0);
    let a_log = m.a_log.to_f32();
    let (lo_a, hi_a) = (0.005f32.ln() - 0.1, 4f32.ln() + 0.1);
    assert!(a_log.iter().all(|&a| a >= lo_a && a <= hi_a), "{a_log:?}");
    assert!(
        a_log.windows(2).any(|w| w[0] > w[1]),
        "A_log should be shuffled: {a_log:?}"
    );
    let mut experts = Vec::new();
    for e in 0..64 {
        experts.extend(ck.expert(1, e).unwrap().down_proj.to_f32());
    }
    let (mean, sd, _, _) = stats(&experts);
    assert!(mean.abs() < 0.02);
    close(
        "experts.down",
        sd,
        1.0 / (c.moe_intermediate_size as f64).sqrt(),
    );
}

#[test]
fn small_shard_limit_writes_an_index() {
    for family in Family::ALL {
        let tmp = TempDir::new("synth-shards");
        let limit = 1 << 20;
        let report = write_random_model(
            tmp.path(),
            &spec(family, Preset::Mini512, 2, WeightDtype::BF16, limit),
        )
        .unwrap();
        let index = read_json(&tmp.path().join("model.safetensors.index.json"));
        let files = weight_files(tmp.path());
        assert!(files.len() > 3, "{files:?}");
        let n = files.len();
        for (i, f) in files.iter().enumerate() {
            assert_eq!(f, &format!("model-{:05}-of-{n:05}.safetensors", i + 1));
            // Header excluded, every shard holds at most the limit unless one tensor is bigger.
            let tensors = common::read_file_tensors(&tmp.path().join(f));
            let bytes: usize = tensors.values().map(|t| t.data.len()).sum();
            assert!(
                bytes as u64 <= limit || tensors.len() == 1,
                "{f}: {bytes} bytes"
            );
        }
        assert!(!tmp.path().join("model.safetensors").exists());
        assert_eq!(
            index["metadata"]["total_size"].as_u64().unwrap(),
            report.weight_bytes
        );
        let all = read_all(tmp.path());
        assert_eq!(all.len(), index["weight_map"].as_object().unwrap().len());
        assert_eq!(
            all.values().map(|t| t.data.len() as u64).sum::<u64>(),
            report.weight_bytes
        );
        load_everything(tmp.path());

        // Sharding does not change any value: compare with a single-file write.
        let single = TempDir::new("synth-single");
        write_random_model(
            single.path(),
            &spec(family, Preset::Mini512, 2, WeightDtype::BF16, 0),
        )
        .unwrap();
        assert_eq!(read_all(single.path()), all);
        // Rewriting the sharded directory as a single file removes the old shards.
        write_random_model(
            tmp.path(),
            &spec(family, Preset::Mini512, 2, WeightDtype::BF16, 0),
        )
        .unwrap();
        assert_eq!(
            weight_files(tmp.path()),
            vec!["model.safetensors".to_string()]
        );
        assert!(!tmp.path().join("model.safetensors.index.json").exists());
        assert!(!tmp.path().join("model-00001-of-00002.safetensors").exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 3);
    }
}

#[test]
fn invalid_config_is_refused() {
    let mut s = spec(Family::Qwen3Next, Preset::Tiny, 0, WeightDtype::BF16, 0);
    s.config.num_experts_per_tok = 0;
    let tmp = TempDir::new("synth-bad");
    let msg = write_random_model(tmp.path(), &s).unwrap_err().to_string();
    assert!(msg.contains("num_experts_per_tok"), "{msg}");
}
