//! Router errors outside a layer step (a step's failures are `ExpertError`s).

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
