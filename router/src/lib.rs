//! Token dispatch for attention nodes: the routed experts of every MoE layer reached over a
//! transport, behind the same `ExpertExecutor` contract as the in-process shard.
//!
//! - [`placement`]: which node holds which experts (static; replicas allowed).
//! - [`plan`]: per layer step, which node serves each (token, expert) pair — one message per
//!   destination, a token sent to each node once, replicas chosen by load (no I/O).
//! - [`remote`]: [`RemoteExperts`], which sends the plan, waits with deadlines, fails over to
//!   replicas and combines the nodes' partial sums in a fixed order.
//! - [`stats`]: calls, bytes against the wire minimum, round trips, failovers.

pub mod error;
pub mod placement;
pub mod plan;
pub mod remote;
pub mod stats;

pub use error::RouterError;
pub use placement::{NodeSpec, Placement, PlacementError};
pub use remote::{RemoteExperts, RouterConfig, StepRecord};
pub use stats::{NodeStats, StatsSnapshot};
