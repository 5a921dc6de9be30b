//! Where the roles' contracts meet, here in the composition so that no side depends on the
//! other: the control plane's two traits implemented for the data plane's types, and the
//! model's expert contract for the router, which works on host rows and knows no backend.
//!
//! - [`RemoteExecutor`]: `ExpertExecutor` over the router ([`RemoteExperts`]): tensors to the
//!   host before a layer step's dispatch and back after it.
//! - [`RouterSink`]: `PlacementSink` for the router.
//! - [`PacedShard`]: `ExpertHolder` for an expert node's shard ([`ExpertShard`]), with
//!   non-urgent loads paced and run at the lowest CPU priority.

use std::sync::Arc;

use myriad_control::expert_agent::ExpertHolder;
use myriad_control::follower::PlacementSink;
use myriad_expert::ExpertShard;
use myriad_kernels::{Backend, Routes};
use myriad_model::moe::{ExpertError, ExpertExecutor, ExpertTicket};
use myriad_router::{Pending, Placement, RemoteExperts, StepError};
use myriad_wire::ExpertSet;
use tokio::sync::watch;

/// The router as the engine sees it: the routed experts of every MoE layer.
pub struct RemoteExecutor<B: Backend> {
    pub router: Arc<RemoteExperts>,
    pub backend: Arc<B>,
}

/// The same failure in the model's words (the messages are the same).
fn expert_error(e: StepError) -> ExpertError {
    match e {
        StepError::NoSuchLayer { layer, layers } => ExpertError::NoSuchLayer { layer, layers },
        StepError::Unavailable {
            layer,
            expert,
            reason,
        } => ExpertError::Unavailable {
            layer,
            expert,
            reason,
        },
        StepError::Remote { layer, reason } => ExpertError::Remote { layer, reason },
    }
}

/// A layer step in flight: its host result is uploaded when it is waited for.
struct RemoteTicket<B: Backend> {
    pending: Pending,
    backend: Arc<B>,
    rows: usize,
    hidden: usize,
}

impl<B: Backend> ExpertTicket<B> for RemoteTicket<B> {
    fn wait(self: Box<Self>) -> Result<B::Tensor, ExpertError> {
        let data = self.pending.wait().map_err(expert_error)?;
        Ok(self.backend.upload(self.rows, self.hidden, &data)?)
    }
}

impl<B: Backend> ExpertExecutor<B> for RemoteExecutor<B> {
    fn begin_step(&self) {
        self.router.begin_step();
    }

    fn end_step(&self) {
        self.router.end_step();
    }

    fn run(
        &self,
        layer: usize,
        x: &B::Tensor,
        routes: &Routes,
        out: &mut B::Tensor,
    ) -> Result<(), ExpertError> {
        let (rows, _) = self.backend.shape(x);
        let ticket = self.submit(
            layer,
            x,
            routes,
            self.backend.zeros(rows, self.router.hidden()),
        )?;
        *out = ticket.wait()?;
        Ok(())
    }

    fn submit(
        &self,
        layer: usize,
        x: &B::Tensor,
        routes: &Routes,
        _out: B::Tensor,
    ) -> Result<Box<dyn ExpertTicket<B>>, ExpertError> {
        let (rows, cols) = self.backend.shape(x);
        let hidden = self.router.hidden();
        if cols != hidden || routes.rows() != rows {
            return Err(ExpertError::Remote {
                layer,
                reason: format!(
                    "{rows}x{cols} hidden rows with {} routed rows for a model of width {hidden}",
                    routes.rows()
                ),
            });
        }
        let pending = self
            .router
            .submit(layer, self.backend.download(x), routes)
            .map_err(expert_error)?;
        Ok(Box::new(RemoteTicket {
            pending,
            backend: self.backend.clone(),
            rows,
            hidden,
        }))
    }
}

/// The router as the follower sees it: placements go in, the version in use and per-expert
/// token counts come out.
pub struct RouterSink(pub Arc<RemoteExperts>);

impl PlacementSink for RouterSink {
    fn set_placement(&self, version: u64, placement: Placement) -> Result<(), String> {
        self.0
            .set_placement(version, placement)
            .map_err(|e| e.to_string())
    }

    fn applied(&self) -> watch::Receiver<u64> {
        self.0.subscribe_applied()
    }

    fn unreachable(&self) -> Vec<String> {
        self.0.unreachable_nodes()
    }

    fn expert_tokens(&self) -> Vec<u64> {
        let per_layer = self.0.expert_tokens();
        let experts = per_layer.first().map_or(0, Vec::len);
        let mut sum = vec![0u64; experts];
        for layer in per_layer {
            for (s, t) in sum.iter_mut().zip(layer) {
                *s += t;
            }
        }
        sum
    }
}

/// An expert shard with the share of one core its background loads may take.
pub struct PacedShard<B: Backend> {
    pub shard: Arc<ExpertShard<B>>,
    /// Fraction of one core a non-urgent load may use (1: as fast as it can).
    pub background_duty: f64,
}

impl<B: Backend> ExpertHolder for PacedShard<B> {
    fn held(&self) -> ExpertSet {
        self.shard.experts()
    }

    fn set_experts(&self, set: &ExpertSet) -> Result<(), String> {
        self.shard
            .set_experts(set)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn set_experts_in_background(&self, set: &ExpertSet) -> Result<(), String> {
        self.shard
            .set_experts_paced(set, self.background_duty)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// A thread with a rayon pool of two of its own; a background one at the lowest CPU
    /// priority and on ordinary pages (a huge-page fault can compact memory and stall the
    /// serving threads).
    fn spawn_loader(
        &self,
        background: bool,
        load: Box<dyn FnOnce() + Send>,
    ) -> std::io::Result<()> {
        let backend = self.shard.backend().clone();
        let prepare = move || backend.prepare_background_thread();
        myriad_expert::background::run_loader("myriad-load", 2, background, prepare, load).map(drop)
    }
}
