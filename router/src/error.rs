//! The router's errors: [`RouterError`] outside a layer step (handshakes, placements) and
//! [`StepError`] for one layer step (the attention side reports it as its `ExpertError`, with
//! the same words).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RouterError {
    #[error("expert node {node} at {addr}: {reason}")]
    Handshake {
        node: String,
        addr: String,
        reason: String,
    },
    #[error(transparent)]
    Placement(#[from] myriad_wire::placement::PlacementError),
}

/// Why one layer step's routed experts could not be computed.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum StepError {
    #[error("layer {layer} is outside this model's {layers} MoE layers")]
    NoSuchLayer { layer: usize, layers: usize },
    /// No node that holds `expert` answered, and no placement moved it elsewhere in time.
    #[error("expert {expert} of layer {layer} is unavailable: {reason}")]
    Unavailable {
        layer: usize,
        expert: u32,
        reason: String,
    },
    #[error("expert nodes failed for layer {layer}: {reason}")]
    Remote { layer: usize, reason: String },
}
