//! [`CheckpointError`]: why weights could not be loaded. Every message names the file and/or
//! the tensor involved.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CheckpointError {
    /// The configuration handed to [`Checkpoint::open`](super::Checkpoint::open) is invalid.
    #[error("invalid model configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{dir}: no model.safetensors or model.safetensors.index.json", dir = .dir.display())]
    NoWeights { dir: PathBuf },
    #[error("{path}: malformed safetensors index: {reason}", path = .path.display())]
    Index { path: PathBuf, reason: String },
    #[error("{path}: not a valid (or a truncated) safetensors file: {source}", path = .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{location}: no text model found: neither {} exists", .tried.join(" nor "))]
    NoTextModel {
        location: String,
        tried: Vec<String>,
    },
    #[error("tensor `{tensor}` not found in {location}")]
    MissingTensor { tensor: String, location: String },
    #[error("tensor `{tensor}`: the index maps it to {path}, which does not contain it", path = .path.display())]
    NotInShard { tensor: String, path: PathBuf },
    #[error(
        "tensor `{tensor}` in {path}: expected shape {expected:?}, found {actual:?}",
        path = .path.display()
    )]
    Shape {
        tensor: String,
        path: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor `{tensor}` in {path}: unsupported dtype {dtype}{hint}", path = .path.display())]
    Dtype {
        tensor: String,
        path: PathBuf,
        dtype: String,
        hint: String,
    },
    #[error(
        "tensor `{tensor}` in {path} is F8_E4M3 but its block-scale tensor `{scale}` is missing",
        path = .path.display()
    )]
    MissingScale {
        tensor: String,
        scale: String,
        path: PathBuf,
    },
    #[error("layer {layer} does not exist (the model has {layers})")]
    NoSuchLayer { layer: usize, layers: usize },
    #[error("expert {expert} does not exist (the model has {experts} per layer)")]
    NoSuchExpert { expert: usize, experts: usize },
}
