//! `generation_config.json`: stop ids and the model's default sampling settings (spec §1.4).
//!
//! The file is optional (a missing file falls back to the ids of `config.json`), but a file that
//! exists and cannot be parsed is an error: silently ignoring it would change stop behaviour.

use std::path::Path;

use serde_json::Value;

use super::json::Section;
use super::{ConfigError, ModelConfig};

/// Stop ids and sampling defaults; `None` means the file does not set the key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub do_sample: Option<bool>,
}

impl GenerationConfig {
    pub const FILE_NAME: &'static str = "generation_config.json";

    /// Reads `dir/generation_config.json`; without the file, the ids of `model` apply.
    pub fn from_dir(dir: &Path, model: &ModelConfig) -> Result<Self, ConfigError> {
        let path = dir.join(Self::FILE_NAME);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_json_str(&text, &path, model),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::defaults_for(model)),
            Err(source) => Err(ConfigError::Io { path, source }),
        }
    }

    /// What applies when a model directory has no generation config.
    pub fn defaults_for(model: &ModelConfig) -> Self {
        GenerationConfig {
            eos_token_ids: model.eos_token_ids.clone(),
            bos_token_id: model.bos_token_id,
            ..Default::default()
        }
    }

    /// Parses the file's JSON; keys it lacks fall back to `model` (ids) or stay unset.
    pub fn from_json_str(
        text: &str,
        origin: &Path,
        model: &ModelConfig,
    ) -> Result<Self, ConfigError> {
        let root: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: origin.to_path_buf(),
            source,
        })?;
        let Value::Object(obj) = &root else {
            return Err(ConfigError::InvalidValue {
                path: origin.to_path_buf(),
                key: "<top level>".into(),
                reason: "expected a JSON object".into(),
            });
        };
        let s = Section::new(obj, "", origin);
        let float = |key: &str| -> Result<Option<f32>, ConfigError> {
            Ok(s.opt_f64(key)?.map(|v| v as f32))
        };
        let top_k = match s.opt_usize("top_k")? {
            None => None,
            Some(k) => Some(
                u32::try_from(k).map_err(|_| s.invalid("top_k", format!("{k} is too large")))?,
            ),
        };
        let vocab = model.vocab_size;
        let ids = s.opt_u32_list("eos_token_id")?;
        if let Some(bad) = ids.iter().flatten().find(|&&id| id as usize >= vocab) {
            return Err(s.invalid(
                "eos_token_id",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        Ok(GenerationConfig {
            eos_token_ids: ids.unwrap_or_else(|| model.eos_token_ids.clone()),
            bos_token_id: s.opt_u32("bos_token_id")?.or(model.bos_token_id),
            pad_token_id: s.opt_u32("pad_token_id")?,
            temperature: float("temperature")?,
            top_p: float("top_p")?,
            top_k,
            do_sample: s.opt_bool("do_sample")?,
        })
    }
}
