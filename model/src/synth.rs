//! Writes a random-weight model directory (`myriad make-model`): `config.json`,
//! `generation_config.json` and safetensors weights in the family's released layout, with the
//! fixtures' weight distributions, deterministic from a seed.
//!
//! Large presets (bench: 3.3 G parameters) are generated in parallel and streamed shard by
//! shard; the whole model is never in memory. Submodules: `plan` (tensor list and init rules),
//! `rng` (seeded generators), `fill` (chunked parallel generation), `writer` (streaming
//! safetensors). Tokenizer files are written elsewhere.

mod fill;
mod plan;
mod rng;
mod writer;

use std::path::{Path, PathBuf};

use myriad_kernels::WeightDtype;
use serde_json::{Map, Value, json};
use thiserror::Error;

use crate::config::{ConfigError, GenerationConfig, ModelConfig};
use crate::presets;
use plan::Planned;
use writer::ShardWriter;

/// What to write.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub config: ModelConfig,
    pub seed: u64,
    /// BF16 or F32 storage (values are bf16-representable either way; `A_log` is always F32).
    pub dtype: WeightDtype,
    /// Most data bytes per shard file; 0 = no limit (one `model.safetensors`).
    pub shard_bytes: u64,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct SynthReport {
    pub dir: PathBuf,
    /// File names written into `dir` (weights, index, configs).
    pub files: Vec<String>,
    pub num_tensors: usize,
    pub num_parameters: u64,
    /// Bytes of tensor data (the index's `total_size`).
    pub weight_bytes: u64,
}

#[derive(Debug, Error)]
pub enum SynthError {
    #[error("invalid model configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("{path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("internal error while writing the model: {0}")]
    Internal(String),
}

const TRANSFORMERS_VERSION: &str = "5.23.0";

/// Writes the model described by `spec` into `dir` (created if needed). Existing weight files
/// of an earlier model in `dir` are removed first so the directory stays consistent.
pub fn write_random_model(dir: &Path, spec: &SynthSpec) -> Result<SynthReport, SynthError> {
    spec.config.validate()?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    remove_stale_weights(dir)?;

    let tensors = plan::plan(&spec.config, spec.dtype);
    let shards = assign_shards(&tensors, spec.shard_bytes);
    let names = shard_names(shards.len());
    let mut files = Vec::new();
    let mut weight_map = Map::new();
    for (shard, file_name) in shards.iter().zip(&names) {
        let path = dir.join(file_name);
        let mut out = ShardWriter::create(&path, shard)?;
        for t in shard {
            fill::write_tensor(t, spec.seed, &mut out)?;
            weight_map.insert(t.name.clone(), json!(file_name));
        }
        out.finish()?;
        files.push(file_name.clone());
    }
    let weight_bytes: u64 = tensors.iter().map(Planned::bytes).sum();
    if shards.len() > 1 {
        let index = json!({"metadata": {"total_size": weight_bytes}, "weight_map": weight_map});
        write_json(&dir.join(INDEX_FILE), &index)?;
        files.push(INDEX_FILE.into());
    }

    write_json(
        &dir.join("config.json"),
        &config_json(&spec.config, spec.dtype),
    )?;
    write_json(
        &dir.join(GenerationConfig::FILE_NAME),
        &generation_json(&spec.config),
    )?;
    files.push("config.json".into());
    files.push(GenerationConfig::FILE_NAME.into());

    Ok(SynthReport {
        dir: dir.to_path_buf(),
        files,
        num_tensors: tensors.len(),
        num_parameters: tensors.iter().map(|t| t.elements() as u64).sum(),
        weight_bytes,
    })
}

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// Greedy in name order, like `save_pretrained(max_shard_size=…)`: a tensor larger than the
/// limit gets a shard of its own.
fn assign_shards(tensors: &[Planned], shard_bytes: u64) -> Vec<Vec<&Planned>> {
    let limit = if shard_bytes == 0 {
        u64::MAX
    } else {
        shard_bytes
    };
    let mut shards: Vec<Vec<&Planned>> = Vec::new();
    let mut current: Vec<&Planned> = Vec::new();
    let mut bytes = 0u64;
    for t in tensors {
        if !current.is_empty() && bytes.saturating_add(t.bytes()) > limit {
            shards.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += t.bytes();
        current.push(t);
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

fn shard_names(count: usize) -> Vec<String> {
    if count == 1 {
        return vec![SINGLE_FILE.into()];
    }
    (1..=count)
        .map(|i| format!("model-{i:05}-of-{count:05}.safetensors"))
        .collect()
}

fn is_weight_file(name: &str) -> bool {
    if name == SINGLE_FILE || name == INDEX_FILE {
        return true;
    }
    // model-NNNNN-of-MMMMM.safetensors
    let Some(rest) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    rest.split_once("-of-")
        .is_some_and(|(a, b)| digits(a) && digits(b))
}

fn remove_stale_weights(dir: &Path) -> Result<(), SynthError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        if name.to_str().is_some_and(is_weight_file) {
            std::fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
        }
    }
    Ok(())
}

fn config_json(config: &ModelConfig, dtype: WeightDtype) -> Value {
    let mut value = config.to_hf_json();
    let name = match dtype {
        WeightDtype::BF16 => "bfloat16",
        WeightDtype::F32 => "float32",
    };
    if let Some(obj) = value.as_object_mut() {
        obj.insert("dtype".into(), json!(name));
        if let Some(Value::Object(text)) = obj.get_mut("text_config") {
            text.insert("dtype".into(), json!(name));
        }
    }
    value
}

/// Like the fixtures' (and the released Instruct models') `generation_config.json`.
fn generation_json(config: &ModelConfig) -> Value {
    let id = |t: &str| presets::special_token_id(config.family, config.vocab_size, t);
    let endoftext = id("<|endoftext|>");
    let eos: Vec<u32> = [id("<|im_end|>"), endoftext]
        .into_iter()
        .flatten()
        .collect();
    json!({
        "bos_token_id": endoftext,
        "eos_token_id": eos,
        "pad_token_id": endoftext,
        "do_sample": true,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "transformers_version": TRANSFORMERS_VERSION,
    })
}

fn write_json(path: &Path, value: &Value) -> Result<(), SynthError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| SynthError::Internal(format!("{}: {e}", path.display())))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_file_names() {
        assert!(is_weight_file("model.safetensors"));
        assert!(is_weight_file("model-00001-of-00003.safetensors"));
        assert!(is_weight_file("model.safetensors.index.json"));
        assert!(!is_weight_file("reference.safetensors"));
        assert!(!is_weight_file("model-a-of-b.safetensors"));
    }
}
