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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use myriad_wire::ExpertSet;
use tokio::sync::watch;

use crate::eplb::{self, NodeAssignment, NodeCapacity};
use crate::keys::Keys;
use crate::membership::Registration;
use crate::records::{Assignment, ControllerStatus, PlacedNode, PlacementDoc, encode};
use crate::store::{Store, StoreError};
use crate::view::ClusterView;

/// How often the controller re-reads node records while it waits for loads and drops
/// (loads take seconds; reading more often only loads etcd, which shares the serving cores).
const LOAD_POLL: Duration = Duration::from_millis(50);

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

/// A placement published whose old copies are not yet dropped.
struct Cleanup {
    version: u64,
    sets: Vec<NodeAssignment>,
}

/// The controller of one cluster.
pub struct Controller {
    store: Arc<dyn Store>,
    keys: Keys,
    config: ControllerConfig,
    registration: Arc<Registration>,
    name: String,
    status: ControllerStatus,
    cleanup: Option<Cleanup>,
    serial: u64,
    last_rebalance: Option<Instant>,
    members: (BTreeSet<String>, Instant),
    /// When each currently suspected expert node was first reported unreachable.
    suspected_since: BTreeMap<String, Instant>,
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
            config,
            registration,
            name: name.to_string(),
            status: ControllerStatus {
                leader: name.to_string(),
                ..ControllerStatus::default()
            },
            cleanup: None,
            serial: 0,
            last_rebalance: None,
            members: (BTreeSet::new(), Instant::now()),
            suspected_since: BTreeMap::new(),
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
                    self.status.last_outcome = format!("error: {e}");
                    let _ = self.save_status().await;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.tick) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// A new leader continues the counters of the last one and finishes its cleanup.
    async fn take_over(&mut self) {
        if let Ok(Some(kv)) = self.store.get(&self.keys.status()).await
            && let Ok(s) = crate::records::decode::<ControllerStatus>(&kv)
        {
            self.status = ControllerStatus {
                leader: self.name.clone(),
                ..s
            };
        }
        if let Ok(v) = ClusterView::read(&*self.store, &self.keys).await {
            self.serial = v.assignments.values().map(|a| a.serial).max().unwrap_or(0);
            if let Some(doc) = &v.current {
                self.cleanup = Some(Cleanup {
                    version: doc.version,
                    sets: doc
                        .sets()
                        .into_iter()
                        .map(|(name, experts)| NodeAssignment { name, experts })
                        .collect(),
                });
            }
        }
    }

    /// One look at the cluster; at most one placement change.
    pub async fn pass(&mut self) -> Result<(), ControlError> {
        let view = ClusterView::read(&*self.store, &self.keys).await?;
        let live: BTreeSet<String> = view.expert_nodes.iter().map(|n| n.name.clone()).collect();
        if live != self.members.0 {
            self.members = (live.clone(), Instant::now());
        }
        let Some(doc) = view.current.clone() else {
            return self.initial(&view).await;
        };
        let gone: Vec<String> = doc
            .nodes
            .iter()
            .filter(|n| !live.contains(&n.name))
            .map(|n| n.name.clone())
            .collect();
        // A node that is registered but that attention nodes cannot reach (hung, partitioned)
        // is as good as gone once the suspicion has lasted `suspect_after`.
        self.suspected_since
            .retain(|node, _| view.suspects.contains_key(node));
        let mut gone = gone;
        for node in view.suspects.keys() {
            let since = *self
                .suspected_since
                .entry(node.clone())
                .or_insert_with(Instant::now);
            if since.elapsed() >= self.config.suspect_after
                && doc.nodes.iter().any(|n| &n.name == node)
                && !gone.contains(node)
            {
                gone.push(node.clone());
            }
        }
        if !gone.is_empty() {
            return self.failover(&view, &gone).await;
        }
        if let Some(node) = view.drain_requests.first().cloned() {
            let outcome = self.drain(&view, &node).await;
            self.store.delete(&self.keys.drain_request(&node)).await?;
            return outcome;
        }
        if let Some(req) = view.rebalance_request.clone() {
            let outcome = self.rebalance(&view, req.extra_replicas).await;
            self.status.last_request = Some(req.id);
            self.status.last_outcome = match &outcome {
                Ok(msg) => msg.clone(),
                Err(e) => format!("error: {e}"),
            };
            self.store.delete(&self.keys.rebalance_request()).await?;
            self.save_status().await?;
            return outcome.map(|_| ());
        }
        if let Some(threshold) = self.config.auto_rebalance_above {
            let due = self
                .last_rebalance
                .is_none_or(|t| t.elapsed() >= self.config.auto_rebalance_every);
            let load = view.load(self.config.num_experts);
            let now = eplb::imbalance(&assignments(&view), &load);
            if due && now > threshold && load.iter().sum::<f64>() > 0.0 {
                let msg = self.rebalance(&view, None).await?;
                self.status.last_outcome = format!("automatic: {msg}");
                self.save_status().await?;
                return Ok(());
            }
        }
        self.try_cleanup(&view).await
    }

    async fn initial(&mut self, view: &ClusterView) -> Result<(), ControlError> {
        let n = self.config.num_experts;
        if view.expert_nodes.len() < self.config.min_expert_nodes
            || self.members.1.elapsed() < self.config.settle
            || view.expert_nodes.is_empty()
        {
            return Ok(());
        }
        // Nodes started with their experts (`--experts`) are adopted as they are when together
        // they hold every expert; otherwise experts are spread by memory.
        let held: Vec<NodeAssignment> = view
            .expert_nodes
            .iter()
            .map(|r| NodeAssignment {
                name: r.name.clone(),
                experts: r.held_set(n),
            })
            .filter(|a| !a.experts.is_empty())
            .collect();
        let covered = held
            .iter()
            .fold(ExpertSet::none(n), |acc, a| acc.union(&a.experts));
        let sets = if covered.len() == n {
            held
        } else {
            let caps: Vec<NodeCapacity> = view
                .expert_nodes
                .iter()
                .map(|r| NodeCapacity {
                    name: r.name.clone(),
                    memory_bytes: r.memory_bytes,
                })
                .collect();
            let bytes = view
                .expert_nodes
                .iter()
                .map(|r| r.expert_bytes)
                .max()
                .unwrap_or(0);
            eplb::initial(&caps, n, bytes, self.config.replicas)?
        };
        self.transition(view, sets, "initial", true).await?;
        self.save_status().await?;
        Ok(())
    }

    async fn failover(&mut self, view: &ClusterView, gone: &[String]) -> Result<(), ControlError> {
        let current = assignments(view);
        let load = view.load(self.config.num_experts);
        let slots = slots(view, &current, self.config.num_experts);
        let gone_refs: Vec<&str> = gone.iter().map(String::as_str).collect();
        let sets = eplb::evacuate(&current, &gone_refs, &load, &slots)?;
        for g in gone {
            self.store.delete(&self.keys.assignment(g)).await?;
        }
        self.transition(view, sets, &format!("failover of {}", gone.join(",")), true)
            .await?;
        self.status.failovers += 1;
        self.status.last_outcome = format!("failed over {}", gone.join(","));
        self.save_status().await?;
        Ok(())
    }

    async fn drain(&mut self, view: &ClusterView, node: &str) -> Result<(), ControlError> {
        if view
            .current
            .as_ref()
            .is_none_or(|d| !d.nodes.iter().any(|n| n.name == node))
        {
            self.status.last_outcome = format!("drain of {node}: it holds nothing");
            self.save_status().await?;
            return Ok(());
        }
        let current = assignments(view);
        let load = view.load(self.config.num_experts);
        let slots = slots(view, &current, self.config.num_experts);
        let sets = eplb::evacuate(&current, &[node], &load, &slots)?;
        self.transition(view, sets, &format!("drain of {node}"), false)
            .await?;
        self.status.drains += 1;
        self.status.last_outcome = format!("drained {node}");
        self.save_status().await?;
        Ok(())
    }

    async fn rebalance(
        &mut self,
        view: &ClusterView,
        extra: Option<usize>,
    ) -> Result<String, ControlError> {
        let t0 = Instant::now();
        let current = assignments(view);
        let load = view.load(self.config.num_experts);
        let slots = slots(view, &current, self.config.num_experts);
        let plan = eplb::rebalance(
            &current,
            &load,
            &slots,
            extra.unwrap_or(self.config.extra_replicas),
        )?;
        self.last_rebalance = Some(Instant::now());
        self.status.imbalance_before = plan.imbalance_before;
        self.status.imbalance_after = plan.imbalance_after;
        if plan.moves == 0 && plan.drops == 0 {
            return Ok(format!(
                "placement already balanced (imbalance {:.3})",
                plan.imbalance_before
            ));
        }
        let version = self
            .transition(view, plan.assignment, "rebalance", false)
            .await?;
        let secs = t0.elapsed().as_secs_f64();
        self.status.rebalances += 1;
        self.status.rebalance_seconds_total += secs;
        self.status.last_rebalance_seconds = secs;
        Ok(format!(
            "version {version}: imbalance {:.3} -> {:.3}, {} copies added, {} dropped, {secs:.2}s",
            plan.imbalance_before, plan.imbalance_after, plan.moves, plan.drops
        ))
    }

    /// Steps 1 and 2 of a change (load, then publish); step 3 follows in [`Self::try_cleanup`].
    /// `urgent`: steps are (or may be) waiting for the new copies, so nodes load at full speed.
    async fn transition(
        &mut self,
        view: &ClusterView,
        sets: Vec<NodeAssignment>,
        reason: &str,
        urgent: bool,
    ) -> Result<u64, ControlError> {
        let n = self.config.num_experts;
        let old = view.placed_sets();
        let new: BTreeMap<String, ExpertSet> = sets
            .iter()
            .filter(|a| !a.experts.is_empty())
            .map(|a| (a.name.clone(), a.experts.clone()))
            .collect();
        if let Some(name) = new.keys().find(|name| view.expert_node(name).is_none()) {
            return Err(ControlError::Node {
                node: name.clone(),
                reason: "is assigned experts but is not registered".into(),
            });
        }
        // A node still dropping copies (a cleanup not yet carried out) reports copies it is
        // about to lose; until it is done, its report cannot acknowledge the loads below.
        self.await_drops(view, &new).await?;
        for (name, set) in &new {
            // Everything it is assigned now stays: the current version's copies and, when the
            // last change is not cleaned up yet, those of versions attention nodes may still run.
            let mut target = old.get(name).map_or(set.clone(), |o| o.union(set));
            if let Some(assigned) = assigned(view, name, n) {
                target = target.union(&assigned);
            }
            self.assign(view, name, &target, urgent).await?;
        }
        // Nodes that only lose experts keep their old sets until the cleanup.
        self.await_loaded(&new).await?;
        let version = view.version() + 1;
        let doc = PlacementDoc {
            version,
            num_experts: n,
            nodes: new
                .iter()
                .map(|(name, set)| PlacedNode {
                    name: name.clone(),
                    addr: view
                        .expert_node(name)
                        .map(|r| r.addr.clone())
                        .unwrap_or_default(),
                    experts: set.to_string(),
                })
                .collect(),
            reason: reason.to_string(),
        };
        doc.to_placement()
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        self.store
            .put(&self.keys.version(version), encode(&doc), None)
            .await?;
        self.store
            .put(&self.keys.current(), version.to_string().into_bytes(), None)
            .await?;
        self.cleanup = Some(Cleanup { version, sets });
        Ok(version)
    }

    async fn assign(
        &mut self,
        view: &ClusterView,
        node: &str,
        set: &ExpertSet,
        urgent: bool,
    ) -> Result<(), ControlError> {
        let spec = set.to_string();
        if view
            .assignments
            .get(node)
            .is_some_and(|a| a.experts == spec)
        {
            return Ok(());
        }
        self.serial += 1;
        let a = Assignment {
            experts: spec,
            serial: self.serial,
            urgent,
        };
        self.store
            .put(&self.keys.assignment(node), encode(&a), None)
            .await?;
        Ok(())
    }

    /// Waits until no node of `new` reports a copy outside its assignment: every drop it was
    /// told to make is done, so that a later report of what it holds is not one it is about to
    /// undo (the agent applies assignments in order and reports after each).
    async fn await_drops(
        &self,
        view: &ClusterView,
        new: &BTreeMap<String, ExpertSet>,
    ) -> Result<(), ControlError> {
        let n = self.config.num_experts;
        let deadline = Instant::now() + self.config.load_timeout;
        let mut now = view.clone();
        loop {
            let mut waiting = None;
            for name in new.keys() {
                let Some(assigned) = assigned(&now, name, n) else {
                    continue;
                };
                let Some(rec) = now.expert_node(name) else {
                    return Err(ControlError::Node {
                        node: name.clone(),
                        reason: "left while dropping experts".into(),
                    });
                };
                if rec.held_set(n).iter().any(|e| !assigned.contains(e)) {
                    waiting = Some(name.clone());
                    break;
                }
            }
            let Some(node) = waiting else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(ControlError::Timeout {
                    what: format!("expert node {node} to drop the experts it was unassigned"),
                    after: self.config.load_timeout,
                });
            }
            tokio::time::sleep(LOAD_POLL).await;
            now = ClusterView::read(&*self.store, &self.keys).await?;
        }
    }

    /// Waits until every node of `new` reports holding its set.
    async fn await_loaded(&self, new: &BTreeMap<String, ExpertSet>) -> Result<(), ControlError> {
        let n = self.config.num_experts;
        let deadline = Instant::now() + self.config.load_timeout;
        loop {
            let view = ClusterView::read(&*self.store, &self.keys).await?;
            let mut waiting = None;
            for (name, set) in new {
                let Some(rec) = view.expert_node(name) else {
                    return Err(ControlError::Node {
                        node: name.clone(),
                        reason: "left while loading its experts".into(),
                    });
                };
                let held = rec.held_set(n);
                if set.iter().any(|e| !held.contains(e)) {
                    let applied = view
                        .assignments
                        .get(name)
                        .is_some_and(|a| a.serial == rec.applied_serial);
                    if let Some(e) = rec.load_error.as_ref().filter(|_| applied) {
                        return Err(ControlError::Node {
                            node: name.clone(),
                            reason: format!("could not load its experts: {e}"),
                        });
                    }
                    waiting = Some(name.clone());
                    break;
                }
            }
            let Some(node) = waiting else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(ControlError::Timeout {
                    what: format!("expert node {node} to load its experts"),
                    after: self.config.load_timeout,
                });
            }
            tokio::time::sleep(LOAD_POLL).await;
        }
    }

    /// Step 3: once every live attention node runs the new version, drop the old copies.
    async fn try_cleanup(&mut self, view: &ClusterView) -> Result<(), ControlError> {
        let Some(c) = &self.cleanup else {
            return Ok(());
        };
        if view.version() != c.version {
            self.cleanup = None;
            return Ok(());
        }
        if view
            .attention_nodes
            .iter()
            .any(|a| a.placement_version < c.version)
        {
            return Ok(());
        }
        let sets: BTreeMap<String, ExpertSet> = c
            .sets
            .iter()
            .map(|a| (a.name.clone(), a.experts.clone()))
            .collect();
        let none = ExpertSet::none(self.config.num_experts);
        for rec in &view.expert_nodes {
            let target = sets.get(&rec.name).unwrap_or(&none).clone();
            self.assign(view, &rec.name, &target, false).await?;
        }
        self.cleanup = None;
        Ok(())
    }

    async fn save_status(&self) -> Result<(), StoreError> {
        self.store
            .put(&self.keys.status(), encode(&self.status), None)
            .await
            .map(|_| ())
    }
}

/// What `node` is assigned now (`None`: no assignment, or one that cannot be read).
fn assigned(view: &ClusterView, node: &str, num_experts: usize) -> Option<ExpertSet> {
    let spec = view.assignments.get(node)?.experts.trim();
    if spec.is_empty() {
        return Some(ExpertSet::none(num_experts));
    }
    ExpertSet::parse(spec, num_experts).ok()
}

/// The current placement as assignments, with every live expert node (new ones empty).
fn assignments(view: &ClusterView) -> Vec<NodeAssignment> {
    let n = view.current.as_ref().map_or(0, |d| d.num_experts);
    let placed = view.placed_sets();
    let mut out: Vec<NodeAssignment> = placed
        .iter()
        .map(|(name, experts)| NodeAssignment {
            name: name.clone(),
            experts: experts.clone(),
        })
        .collect();
    for r in &view.expert_nodes {
        if !placed.contains_key(&r.name) {
            out.push(NodeAssignment {
                name: r.name.clone(),
                experts: ExpertSet::none(n),
            });
        }
    }
    out
}

/// Expert slots per node of `current` (a node without a record keeps what it has).
fn slots(view: &ClusterView, current: &[NodeAssignment], num_experts: usize) -> Vec<usize> {
    current
        .iter()
        .map(|a| {
            view.expert_node(&a.name).map_or(a.experts.len(), |r| {
                r.slots(num_experts).max(a.experts.len())
            })
        })
        .collect()
}
