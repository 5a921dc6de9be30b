//! Typed, key-naming access to one JSON object of a config file.
//!
//! A [`Section`] knows the file and the dotted path of its object (`text_config.` for the
//! nested Qwen3.5 layout), so every error it produces names the full key and the file.
//! JSON `null` is treated as absent, as transformers does for optional keys.

use std::path::Path;

use serde_json::{Map, Value};

use super::ConfigError;

#[derive(Clone)]
pub(crate) struct Section<'a> {
    obj: &'a Map<String, Value>,
    prefix: String,
    path: &'a Path,
}

impl<'a> Section<'a> {
    pub(crate) fn new(obj: &'a Map<String, Value>, prefix: &str, path: &'a Path) -> Self {
        Section {
            obj,
            prefix: prefix.to_string(),
            path,
        }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn path(&self) -> &'a Path {
        self.path
    }

    /// The full dotted name of `key` in this section, for messages.
    pub(crate) fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        match self.obj.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub(crate) fn missing(&self, key: &str) -> ConfigError {
        ConfigError::MissingKey {
            path: self.path.to_path_buf(),
            key: self.key(key),
        }
    }

    pub(crate) fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            path: self.path.to_path_buf(),
            key: self.key(key),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Unsupported {
            path: self.path.to_path_buf(),
            key: self.key(key),
            reason: reason.into(),
        }
    }

    pub(crate) fn opt_object(&self, key: &str) -> Result<Option<Section<'a>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(Section::new(
                o,
                &self.key(&format!("{key}.")),
                self.path,
            ))),
            Some(v) => Err(self.invalid(key, format!("expected an object, found {v}"))),
        }
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.invalid(key, format!("expected a non-negative integer, found {v}"))
                }),
        }
    }

    pub(crate) fn req_usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.invalid(key, format!("expected a number, found {v}"))),
        }
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.invalid(key, format!("expected true or false, found {v}"))),
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.invalid(key, format!("expected a string, found {v}"))),
        }
    }

    pub(crate) fn opt_u32(&self, key: &str) -> Result<Option<u32>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => token_id(v)
                .map(Some)
                .ok_or_else(|| self.invalid(key, format!("expected a token id, found {v}"))),
        }
    }

    /// A token-id key that may be one id or a list of ids (`eos_token_id`).
    pub(crate) fn opt_u32_list(&self, key: &str) -> Result<Option<Vec<u32>>, ConfigError> {
        let bad = |v: &Value| {
            self.invalid(
                key,
                format!("expected a token id or a list of token ids, found {v}"),
            )
        };
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| token_id(v).ok_or_else(|| bad(v)))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => token_id(v).map(|id| Some(vec![id])).ok_or_else(|| bad(v)),
        }
    }

    pub(crate) fn opt_array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.invalid(key, format!("expected a list, found {v}"))),
        }
    }
}

fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}
