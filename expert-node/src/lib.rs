//! The expert role: holds a shard of the routed experts of every MoE layer and runs them.
//!
//! An expert node keeps no per-sequence state: it receives hidden vectors with the experts and
//! weights each needs, runs grouped SwiGLU matmuls, and returns each row's weighted sum. The
//! same [`ExpertShard`] is the in-process executor of the single-process engine. Its expert set
//! can change while it serves (`ExpertShard::set_experts`); loading runs at low CPU priority
//! (`background`).

pub mod background;
pub mod service;
pub mod shard;

pub use myriad_model::{ExpertSet, ExpertSetError};
pub use service::{ExpertService, NodeIdentity};
pub use shard::{ExpertShard, ShardError};
