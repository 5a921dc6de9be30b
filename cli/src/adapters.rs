//! Where the control plane meets the data plane: its two traits implemented for the data
//! plane's types, here in the composition so that neither side depends on the other.
//!
//! - [`RouterSink`]: `PlacementSink` for the attention node's router ([`RemoteExperts`]).
//! - [`PacedShard`]: `ExpertHolder` for an expert node's shard ([`ExpertShard`]), with
//!   non-urgent loads paced and run at the lowest CPU priority.

use std::sync::Arc;

use myriad_control::expert_agent::ExpertHolder;
use myriad_control::follower::PlacementSink;
use myriad_expert::ExpertShard;
use myriad_kernels::Backend;
use myriad_router::{Placement, RemoteExperts};
use myriad_wire::ExpertSet;
use tokio::sync::watch;

/// The router as the follower sees it: placements go in, the version in use and per-expert
/// token counts come out.
pub struct RouterSink<B: Backend>(pub Arc<RemoteExperts<B>>);

impl<B: Backend> PlacementSink for RouterSink<B> {
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
