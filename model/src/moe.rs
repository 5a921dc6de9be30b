//! The contract between an MoE block and whatever runs its routed experts.
//!
//! The attention side computes the router, the shared expert and the combine; the routed
//! experts are reached only through [`ExpertExecutor`]. The single-process engine implements
//! it with local weights (`myriad-expert`); the router implements it over the network.
//!
//! A run can be started with [`ExpertExecutor::submit`] and collected later through its
//! [`ExpertTicket`], so the caller can compute the shared expert (or another micro-batch's
//! attention) while the routed experts are in flight.

use myriad_kernels::{Backend, KernelError, Routes};
use thiserror::Error;

/// A routed-expert run in flight.
pub trait ExpertTicket<B: Backend>: Send {
    /// Waits for the run and returns its output `[n, H]`.
    fn wait(self: Box<Self>) -> Result<B::Tensor, ExpertError>;
}

/// A run that already finished (what synchronous executors hand out).
pub struct Ready<T>(pub T);

impl<B: Backend> ExpertTicket<B> for Ready<B::Tensor> {
    fn wait(self: Box<Self>) -> Result<B::Tensor, ExpertError> {
        Ok(self.0)
    }
}

/// Runs hidden vectors through routed experts.
pub trait ExpertExecutor<B: Backend>: Send + Sync {
    /// A forward step starts: every layer until [`Self::end_step`] belongs to one step, so an
    /// executor whose expert placement can change applies changes only between these calls.
    fn begin_step(&self) {}

    /// The forward step that [`Self::begin_step`] opened has ended (successfully or not).
    fn end_step(&self) {}

    /// For MoE layer `layer`, writes `out[r] = Σ_j w_j · Expert_{e_j}(x[r])` over row `r`'s
    /// (expert, weight) pairs in `routes`. `x` and `out` are `[n, H]`.
    fn run(
        &self,
        layer: usize,
        x: &B::Tensor,
        routes: &Routes,
        out: &mut B::Tensor,
    ) -> Result<(), ExpertError>;

    /// Starts the same computation; `out` (`[n, H]`) is handed back by the ticket. The default
    /// runs synchronously.
    fn submit(
        &self,
        layer: usize,
        x: &B::Tensor,
        routes: &Routes,
        mut out: B::Tensor,
    ) -> Result<Box<dyn ExpertTicket<B>>, ExpertError> {
        self.run(layer, x, routes, &mut out)?;
        Ok(Box::new(Ready(out)))
    }
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
    #[error("expert nodes failed for layer {layer}: {reason}")]
    Remote { layer: usize, reason: String },
}
