//! Errors a kernel call can report. Shape mismatches between tensors that model code builds
//! are programming errors and panic; these are the failures that depend on data.

use thiserror::Error;

/// A kernel-level failure that depends on input data rather than on a programming mistake.
#[derive(Debug, Error)]
pub enum KernelError {
    #[error("weight matrix {rows}x{cols} of {dtype} needs {expected} bytes, got {actual}")]
    MatrixBytes {
        rows: usize,
        cols: usize,
        dtype: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("host tensor of {rows}x{cols} needs {expected} values, got {actual}")]
    TensorLen {
        rows: usize,
        cols: usize,
        expected: usize,
        actual: usize,
    },
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("expert {expert} is not loaded on this executor")]
    MissingExpert { expert: u32 },
    #[error("state does not fit this layer: {0}")]
    StateShape(String),
}
