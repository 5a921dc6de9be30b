//! Errors of the attention role: loading a model, validating requests, running steps.

use myriad_kernels::KernelError;
use myriad_model::checkpoint::CheckpointError;
use myriad_model::config::ConfigError;
use myriad_model::moe::ExpertError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("tensor {name}: {source}")]
    Tensor { name: String, source: KernelError },
    #[error("tensors {names} cannot be fused: {reason}")]
    Fuse { names: String, reason: String },
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("routed experts failed: {0}")]
    Experts(#[from] ExpertError),
    #[error("request {index}: {message}")]
    BadRequest { index: usize, message: String },
    #[error("batch is inconsistent: {0}")]
    Batch(String),
    /// A sequence state handed over from another node does not fit this one.
    #[error("sequence state refused: {0}")]
    State(String),
}
