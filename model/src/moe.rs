//! The contract between an MoE block and whatever runs its routed experts.
//!
//! The attention side computes the router, the shared expert and the combine; the routed
//! experts are reached only through [`ExpertExecutor`]. The single-process engine implements
//! it with local weights (`myriad-expert`); the router implements it over the network.

use myriad_kernels::{Backend, KernelError, Routes};
use thiserror::Error;

/// Runs hidden vectors through routed experts.
pub trait ExpertExecutor<B: Backend>: Send + Sync {
    /// For MoE layer `layer`, writes `out[r] = Σ_j w_j · Expert_{e_j}(x[r])` over row `r`'s
    /// (expert, weight) pairs in `routes`, summed in route order. `x` and `out` are `[n, H]`.
    fn run(
        &self,
        layer: usize,
        x: &B::Tensor,
        routes: &Routes,
        out: &mut B::Tensor,
    ) -> Result<(), ExpertError>;
}

/// Why routed experts could not be run.
#[derive(Debug, Error)]
pub enum ExpertError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("layer {layer} is outside this model's {layers} MoE layers")]
    NoSuchLayer { layer: usize, layers: usize },
    #[error("expert {expert} of layer {layer} is unavailable: {reason}")]
    Unavailable {
        layer: usize,
        expert: u32,
        reason: String,
    },
}
