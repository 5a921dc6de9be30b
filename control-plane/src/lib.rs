//! The control plane: which expert nodes serve which experts, who is alive, and how that
//! changes.
//!
//! | module | owns |
//! | --- | --- |
//! | [`store`] | the [`Store`] contract (keys, revisions, leases, watches) |
//! | [`etcd`] | [`EtcdStore`]: the contract on etcd |
//! | [`memory`] | [`MemoryStore`]: the contract in memory (embedded default, unit tests) |
//! | [`eplb`] | initial placement by memory and the EPLB-style rebalancer (pure) |
//! | [`keys`] | the key layout under `/myriad/{cluster}/` |
//! | [`records`] | the JSON values stored under those keys |
//! | [`view`] | [`ClusterView`]: one read of a cluster's state |
//! | [`membership`] | [`Registration`]: a node's keys under a lease kept alive |
//! | [`controller`] | [`Controller`]: initial placement, failover, drain, rebalance (make-before-break); its decisions without I/O in [`controller::machine`] |
//! | [`follower`] | the attention node's side: follow placements, report version and load |
//! | [`expert_agent`] | the expert node's side: load what it is assigned, report what it holds |
//! | [`testing`] | [`testing::EtcdServer`]: a real etcd process for tests |

pub mod controller;
pub mod eplb;
pub mod etcd;
pub mod expert_agent;
pub mod follower;
pub mod keys;
pub mod membership;
pub mod memory;
pub mod records;
pub mod store;
pub mod testing;
pub mod view;

pub use controller::{ControlError, Controller, ControllerConfig};
pub use etcd::EtcdStore;
pub use keys::Keys;
pub use membership::Registration;
pub use memory::MemoryStore;
pub use store::{BoxFuture, KeyValue, LeaseId, Store, StoreError, Watch, WatchEvent};
pub use view::ClusterView;
