//! Token dispatch for attention nodes: the routed experts of every MoE layer reached over a
//! transport, behind the same `ExpertExecutor` contract as the in-process shard.
//!
//! - [`Placement`] (which node holds which experts; replicas allowed) is a node-to-node
//!   contract and lives in `myriad-wire`; it is re-exported here.
//! - [`plan`]: per layer step, which node serves each (token, expert) pair — one message per
//!   destination, a token sent to each node once, replicas chosen by load (no I/O).
//! - [`dispatch`]: one layer step's decisions without I/O: rounds of plans, retries on
//!   replicas, waits for a newer placement, the fixed-order combine.
//! - [`remote`]: [`RemoteExperts`], the async shell that sends the rounds with deadlines,
//!   feeds replies and placement changes back, and keeps node health across steps.
//! - [`stats`]: calls, bytes against the wire minimum, round trips, failovers.

pub mod dispatch;
pub mod error;
pub mod plan;
pub mod remote;
pub mod stats;

pub use error::{RouterError, StepError};
pub use myriad_wire::{NodeSpec, Placement, PlacementError};
pub use remote::{Pending, RemoteExperts, RouterConfig, StepRecord};
pub use stats::{NodeStats, StatsSnapshot};
