//! [`ConfigError`]: why a `config.json` / `generation_config.json` was rejected.
//!
//! Every variant carries the file it came from and the offending key, so a message read in a
//! log is enough to fix the file.

use std::path::PathBuf;

use thiserror::Error;

/// A configuration file could not be read or does not describe a model we can serve.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed JSON: {source}", path = .path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: missing required key `{key}`", path = .path.display())]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: key `{key}`: {reason}", path = .path.display())]
    InvalidValue {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error(
        "{path}: unknown `{key}` `{value}` (supported: qwen3_next, qwen3_5_moe, qwen3_5_moe_text)",
        path = .path.display()
    )]
    UnknownModelType {
        path: PathBuf,
        key: String,
        value: String,
    },
    #[error("{path}: unsupported `{key}`: {reason}", path = .path.display())]
    Unsupported {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: inconsistent `{keys}`: {reason}", path = .path.display())]
    Inconsistent {
        path: PathBuf,
        keys: String,
        reason: String,
    },
}

impl ConfigError {
    /// The file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            ConfigError::Io { path, .. }
            | ConfigError::Json { path, .. }
            | ConfigError::MissingKey { path, .. }
            | ConfigError::InvalidValue { path, .. }
            | ConfigError::UnknownModelType { path, .. }
            | ConfigError::Unsupported { path, .. }
            | ConfigError::Inconsistent { path, .. } => path,
        }
    }
}
