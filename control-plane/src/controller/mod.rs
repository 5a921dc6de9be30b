//! The controller: the one node (elected through a leased `controller/leader` key) that changes
//! the placement. It makes the initial placement, fails over the experts of nodes whose lease
//! lapsed, drains nodes, and rebalances on request or when the load reports show the nodes out
//! of balance.
//!
//! Every change is make-before-break:
//! 1. each expert node is assigned the union of what it is assigned now (the current version's
//!    copies, and those of older versions while the last change is not cleaned up) and its new
//!    set, and loads what it lacks; the controller first waits for drops still in flight (a
//!    report of what a node holds must not include copies it is about to drop), then until
//!    every node reports holding its new set;
//! 2. the new version is published; attention nodes switch to it between steps and report it;
//! 3. only when every live attention node runs the new version are the old copies dropped.
//!    Until then the old copies stay, so no step ever routes to an expert that is gone.
//!
//! The decisions are made without I/O in [`machine`] (reads of the cluster and the time go in,
//! writes and waits come out); this file owns the thin async shell around it: the leadership
//! loop, reading the [`ClusterView`], carrying out the machine's actions against the [`Store`]
//! and sleeping when it asks to.
//!
//! | module | owns |
//! | --- | --- |
//! | [`machine`] | [`machine::Machine`]: what a pass decides, on a clock it is handed |
//! | `machine/steps` | how a pass carries it out: queued writes, failures, the stages of a change |
//! | `machine/change` | one make-before-break change: its checks (drops, loads) and its version |

pub mod machine;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::eplb;
use crate::keys::Keys;
use crate::membership::Registration;
use crate::records::{ControllerStatus, encode};
use crate::store::{Store, StoreError};
use crate::view::ClusterView;
use machine::{Action, Event, Machine, Write};

/// Controller settings.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub num_experts: usize,
    /// Expert nodes to wait for before making the initial placement.
    pub min_expert_nodes: usize,
    /// Membership must be unchanged this long before the initial placement.
    pub settle: Duration,
    /// Copies of every expert in the initial placement.
    pub replicas: usize,
    /// Extra copies of hot experts a rebalance may make.
    pub extra_replicas: usize,
    /// Longest wait for expert nodes to load what they were assigned.
    pub load_timeout: Duration,
    /// Rebalance by itself when the reported imbalance (max/mean node load) exceeds this.
    pub auto_rebalance_above: Option<f64>,
    /// Least time between two automatic rebalances.
    pub auto_rebalance_every: Duration,
    /// How often the controller looks at the cluster.
    pub tick: Duration,
    /// How long an attention node must report an expert node unreachable (while its lease
    /// lives) before its experts are moved as if it had died.
    pub suspect_after: Duration,
}

impl ControllerConfig {
    pub fn new(num_experts: usize) -> Self {
        ControllerConfig {
            num_experts,
            min_expert_nodes: 1,
            settle: Duration::from_millis(500),
            replicas: 1,
            extra_replicas: 0,
            load_timeout: Duration::from_secs(300),
            auto_rebalance_above: None,
            auto_rebalance_every: Duration::from_secs(60),
            tick: Duration::from_millis(100),
            suspect_after: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Eplb(#[from] eplb::EplbError),
    #[error("expert node {node} {reason}")]
    Node { node: String, reason: String },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("{0}")]
    Invalid(String),
}

/// The controller of one cluster.
pub struct Controller {
    store: Arc<dyn Store>,
    keys: Keys,
    tick: Duration,
    registration: Arc<Registration>,
    name: String,
    machine: Machine,
}

impl Controller {
    pub fn new(
        store: Arc<dyn Store>,
        keys: Keys,
        registration: Arc<Registration>,
        name: &str,
        config: ControllerConfig,
    ) -> Self {
        Controller {
            store,
            keys,
            tick: config.tick,
            registration,
            name: name.to_string(),
            machine: Machine::new(name, config, Instant::now()),
        }
    }

    /// Competes for leadership and, while leader, keeps the placement right, until `shutdown`
    /// turns true. Errors of one pass are recorded in the status and retried on the next.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut leader = false;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let was_leader = leader;
            leader = match self.registration.owns(&self.keys.leader()).await {
                Ok(true) => true,
                Ok(false) => self
                    .registration
                    .create(&self.keys.leader(), self.name.clone().into_bytes())
                    .await
                    .unwrap_or(false),
                Err(_) => false,
            };
            if leader {
                if !was_leader {
                    self.take_over().await;
                }
                if let Err(e) = self.pass().await {
                    let status = self.machine.record_error(&e);
                    let _ = self.save_status(&status).await;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.tick) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// A new leader continues the counters of the last one and finishes its cleanup.
    async fn take_over(&mut self) {
        let stored = match self.store.get(&self.keys.status()).await {
            Ok(Some(kv)) => crate::records::decode::<ControllerStatus>(&kv).ok(),
            _ => None,
        };
        let view = ClusterView::read(&*self.store, &self.keys).await.ok();
        self.machine.take_over(stored, view.as_ref());
    }

    /// One look at the cluster; at most one placement change.
    pub async fn pass(&mut self) -> Result<(), ControlError> {
        let view = ClusterView::read(&*self.store, &self.keys).await?;
        let mut action = self.machine.start_pass(view, Instant::now());
        loop {
            let event = match action {
                Action::Done(outcome) => return outcome,
                Action::ReadView { after } => {
                    if !after.is_zero() {
                        tokio::time::sleep(after).await;
                    }
                    match ClusterView::read(&*self.store, &self.keys).await {
                        Ok(view) => Event::View(view),
                        Err(e) => Event::Failed(e),
                    }
                }
                Action::Write(write) => match self.write(write).await {
                    Ok(()) => Event::Written,
                    Err(e) => Event::Failed(e),
                },
            };
            action = self.machine.handle(event, Instant::now());
        }
    }

    /// Carries out one of the machine's writes.
    async fn write(&self, write: Write) -> Result<(), StoreError> {
        let k = &self.keys;
        match write {
            Write::PutAssignment { node, assignment } => {
                self.store
                    .put(&k.assignment(&node), encode(&assignment), None)
                    .await?;
            }
            Write::DeleteAssignment { node } => {
                self.store.delete(&k.assignment(&node)).await?;
            }
            Write::PutVersion(doc) => {
                self.store
                    .put(&k.version(doc.version), encode(&doc), None)
                    .await?;
            }
            Write::SetCurrent { version } => {
                self.store
                    .put(&k.current(), version.to_string().into_bytes(), None)
                    .await?;
            }
            Write::DeleteDrainRequest { node } => {
                self.store.delete(&k.drain_request(&node)).await?;
            }
            Write::DeleteRebalanceRequest => {
                self.store.delete(&k.rebalance_request()).await?;
            }
            Write::SaveStatus(status) => self.save_status(&status).await?,
        }
        Ok(())
    }

    async fn save_status(&self, status: &ControllerStatus) -> Result<(), StoreError> {
        self.store
            .put(&self.keys.status(), encode(status), None)
            .await
            .map(|_| ())
    }
}
