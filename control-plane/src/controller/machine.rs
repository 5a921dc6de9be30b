//! The controller's decisions without I/O, in quinn-proto's shape: a [`Machine`] holds what the
//! controller remembers between passes (membership and since when, suspicions, the last
//! rebalance, the cleanup still owed, the assignment serial, the status) and the pass in
//! progress. Reads of the cluster and the time go in as arguments, the writes to make and the
//! waits come out as [`Action`]s; the async shell ([`super::Controller`]) carries them out
//! against the store, and tests drive the machine on a clock of their own.
//!
//! A pass is a strict exchange. [`Machine::start_pass`] takes a fresh [`ClusterView`] and
//! returns the first action; every action but [`Action::Done`] is answered by exactly one
//! [`Event`] through [`Machine::handle`] (a write by `Written` or `Failed`, a read by `View` or
//! `Failed`), which returns the next. A failed write ends the step it was part of: the writes
//! queued after it are not made, and what the pass does instead depends on why it was writing
//! (a drain still deletes its request, a rebalance request still records its outcome).

mod change;
mod steps;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use myriad_wire::ExpertSet;

use super::{ControlError, ControllerConfig};
use crate::eplb::{self, NodeAssignment, NodeCapacity};
use crate::records::{Assignment, ControllerStatus, PlacementDoc, Request};
use crate::store::StoreError;
use crate::view::ClusterView;
use change::{Change, assignments, slots};
use steps::{Job, OnFail, Pass, Pending, Stage, Summary, Then, assign};

/// How often the controller re-reads node records while it waits for loads and drops
/// (loads take seconds; reading more often only loads etcd, which shares the serving cores).
pub const LOAD_POLL: Duration = Duration::from_millis(50);

/// A store write the machine asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// `assign/{node}`.
    PutAssignment {
        node: String,
        assignment: Assignment,
    },
    DeleteAssignment {
        node: String,
    },
    /// `placement/versions/{version}`.
    PutVersion(PlacementDoc),
    /// `placement/current`.
    SetCurrent {
        version: u64,
    },
    DeleteDrainRequest {
        node: String,
    },
    DeleteRebalanceRequest,
    /// `status/controller`.
    SaveStatus(ControllerStatus),
}

/// What the shell is to do next.
#[derive(Debug)]
pub enum Action {
    /// Make this write, then answer [`Event::Written`] or [`Event::Failed`].
    Write(Write),
    /// Read the cluster once `after` has passed, then answer [`Event::View`] or
    /// [`Event::Failed`].
    ReadView { after: Duration },
    /// The pass is over, with this outcome.
    Done(Result<(), ControlError>),
}

/// The answer to the last action.
// One event is alive at a time and moved once into `handle`: boxing the view would cost an
// allocation per read to save a copy of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event {
    View(ClusterView),
    Written,
    Failed(StoreError),
}

/// A placement published whose old copies are not yet dropped.
struct Cleanup {
    version: u64,
    sets: Vec<NodeAssignment>,
}

/// The controller's decision state; see the module documentation.
pub struct Machine {
    config: ControllerConfig,
    name: String,
    status: ControllerStatus,
    cleanup: Option<Cleanup>,
    serial: u64,
    last_rebalance: Option<Instant>,
    /// The live expert nodes and since when they have been these.
    members: (BTreeSet<String>, Instant),
    /// When each currently suspected expert node was first reported unreachable.
    suspected_since: BTreeMap<String, Instant>,
    pass: Option<Pass>,
}

impl Machine {
    /// The machine of the controller `name`, started at `now`.
    pub fn new(name: &str, config: ControllerConfig, now: Instant) -> Self {
        Machine {
            config,
            name: name.to_string(),
            status: ControllerStatus {
                leader: name.to_string(),
                ..ControllerStatus::default()
            },
            cleanup: None,
            serial: 0,
            last_rebalance: None,
            members: (BTreeSet::new(), now),
            suspected_since: BTreeMap::new(),
            pass: None,
        }
    }

    pub fn status(&self) -> &ControllerStatus {
        &self.status
    }

    /// The serial of the last assignment handed out.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The version whose old copies are still to be dropped.
    pub fn cleanup_owed(&self) -> Option<u64> {
        self.cleanup.as_ref().map(|c| c.version)
    }

    /// Becoming leader: the counters of the last leader (its stored status) go on, serials
    /// continue above every assignment's, and the current version's cleanup is finished, since
    /// the last leader may have died before it. `None`: that read failed, which changes nothing.
    pub fn take_over(&mut self, stored: Option<ControllerStatus>, view: Option<&ClusterView>) {
        if let Some(s) = stored {
            self.status = ControllerStatus {
                leader: self.name.clone(),
                ..s
            };
        }
        if let Some(v) = view {
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

    /// A pass ended with `error`: the status to save says so.
    pub fn record_error(&mut self, error: &ControlError) -> ControllerStatus {
        self.status.last_outcome = format!("error: {error}");
        self.status.clone()
    }

    /// One look at the cluster (`view`, read at `now`); at most one placement change.
    pub fn start_pass(&mut self, view: ClusterView, now: Instant) -> Action {
        // The store keeps whatever a pass abandoned midway (its shell dropped) had written;
        // the next pass starts from what it reads.
        self.pass = None;
        let live: BTreeSet<String> = view.expert_nodes.iter().map(|n| n.name.clone()).collect();
        if live != self.members.0 {
            self.members = (live.clone(), now);
        }
        let Some(placed) = view
            .current
            .as_ref()
            .map(|d| d.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>())
        else {
            return self.initial(view, now);
        };
        let gone = self.gone(&view, &placed, &live, now);
        if !gone.is_empty() {
            return self.failover(view, gone, now);
        }
        if let Some(node) = view.drain_requests.first().cloned() {
            return self.drain(view, node, now);
        }
        if let Some(request) = view.rebalance_request.clone() {
            return self.rebalance(view, Some(request), now);
        }
        if let Some(threshold) = self.config.auto_rebalance_above {
            let due = self.last_rebalance.is_none_or(|t| {
                now.saturating_duration_since(t) >= self.config.auto_rebalance_every
            });
            let load = view.load(self.config.num_experts);
            let imbalance = eplb::imbalance(&assignments(&view), &load);
            if due && imbalance > threshold && load.iter().sum::<f64>() > 0.0 {
                return self.rebalance(view, None, now);
            }
        }
        self.try_cleanup(&view, now)
    }

    /// The answer to the last action (at `now`); returns the next.
    pub fn handle(&mut self, event: Event, now: Instant) -> Action {
        let Some(Pass { job, stage }) = self.pass.take() else {
            return Action::Done(Err(ControlError::Invalid(format!(
                "controller: {event:?} answers nothing (no pass in progress)"
            ))));
        };
        match (stage, event) {
            (Stage::Writing { queue, then, .. }, Event::Written) => {
                self.write_next(job, queue, then, now)
            }
            (Stage::Writing { on_fail, queue, .. }, Event::Failed(e)) => match on_fail {
                OnFail::End => Action::Done(Err(e.into())),
                OnFail::FailChange => self.after_change(job, Err(e.into()), now),
                OnFail::Record => self.write_next(job, queue, Then::Done(Err(e.into())), now),
            },
            (Stage::AwaitingDrops { change, deadline }, Event::View(view)) => {
                let waiting = change.dropping(&view);
                self.after_drops(job, change, waiting, deadline, now)
            }
            (Stage::AwaitingLoads { change, deadline }, Event::View(view)) => {
                let waiting = change.loading(&view);
                self.after_loads(job, change, waiting, deadline, now)
            }
            (Stage::AwaitingDrops { .. } | Stage::AwaitingLoads { .. }, Event::Failed(e)) => {
                self.after_change(job, Err(e.into()), now)
            }
            (_, event) => Action::Done(Err(ControlError::Invalid(format!(
                "controller: {event:?} does not answer the action handed out"
            )))),
        }
    }

    /// Nodes of the placement that are gone: lapsed, or suspected for `suspect_after`.
    fn gone(
        &mut self,
        view: &ClusterView,
        placed: &[String],
        live: &BTreeSet<String>,
        now: Instant,
    ) -> Vec<String> {
        let mut gone: Vec<String> = placed
            .iter()
            .filter(|n| !live.contains(*n))
            .cloned()
            .collect();
        // A node that is registered but that attention nodes cannot reach (hung, partitioned)
        // is as good as gone once the suspicion has lasted `suspect_after`.
        self.suspected_since
            .retain(|node, _| view.suspects.contains_key(node));
        for node in view.suspects.keys() {
            let since = *self.suspected_since.entry(node.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= self.config.suspect_after
                && placed.contains(node)
                && !gone.contains(node)
            {
                gone.push(node.clone());
            }
        }
        gone
    }

    fn initial(&mut self, view: ClusterView, now: Instant) -> Action {
        let n = self.config.num_experts;
        if view.expert_nodes.len() < self.config.min_expert_nodes
            || now.saturating_duration_since(self.members.1) < self.config.settle
            || view.expert_nodes.is_empty()
        {
            return Action::Done(Ok(()));
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
            match eplb::initial(&caps, n, bytes, self.config.replicas) {
                Ok(sets) => sets,
                Err(e) => return Action::Done(Err(e.into())),
            }
        };
        let change = Change::new(view, sets, "initial".into(), true, n);
        self.write_next(Job::Initial, VecDeque::new(), Then::Drops(change), now)
    }

    fn failover(&mut self, view: ClusterView, gone: Vec<String>, now: Instant) -> Action {
        let n = self.config.num_experts;
        let current = assignments(&view);
        let load = view.load(n);
        let slots = slots(&view, &current, n);
        let gone_refs: Vec<&str> = gone.iter().map(String::as_str).collect();
        let sets = match eplb::evacuate(&current, &gone_refs, &load, &slots) {
            Ok(sets) => sets,
            Err(e) => return Action::Done(Err(e.into())),
        };
        let deletes = gone
            .iter()
            .map(|g| {
                let write = Write::DeleteAssignment { node: g.clone() };
                (Pending::Ready(write), OnFail::FailChange)
            })
            .collect();
        let reason = format!("failover of {}", gone.join(","));
        let change = Change::new(view, sets, reason, true, n);
        self.write_next(Job::Failover { gone }, deletes, Then::Drops(change), now)
    }

    fn drain(&mut self, view: ClusterView, node: String, now: Instant) -> Action {
        let delete = Pending::Ready(Write::DeleteDrainRequest { node: node.clone() });
        if view
            .current
            .as_ref()
            .is_none_or(|d| !d.nodes.iter().any(|n| n.name == node))
        {
            self.status.last_outcome = format!("drain of {node}: it holds nothing");
            let writes = [(Pending::Status, OnFail::Record), (delete, OnFail::End)];
            return self.tail(writes.into(), Ok(()), now);
        }
        let n = self.config.num_experts;
        let current = assignments(&view);
        let load = view.load(n);
        let slots = slots(&view, &current, n);
        let sets = match eplb::evacuate(&current, &[node.as_str()], &load, &slots) {
            Ok(sets) => sets,
            Err(e) => return self.tail([(delete, OnFail::End)].into(), Err(e.into()), now),
        };
        let change = Change::new(view, sets, format!("drain of {node}"), false, n);
        self.write_next(
            Job::Drain { node },
            VecDeque::new(),
            Then::Drops(change),
            now,
        )
    }

    fn rebalance(&mut self, view: ClusterView, request: Option<Request>, now: Instant) -> Action {
        let n = self.config.num_experts;
        let current = assignments(&view);
        let load = view.load(n);
        let slots = slots(&view, &current, n);
        let extra = request
            .as_ref()
            .and_then(|r| r.extra_replicas)
            .unwrap_or(self.config.extra_replicas);
        let plan = match eplb::rebalance(&current, &load, &slots, extra) {
            Ok(plan) => plan,
            Err(e) => return self.rebalanced(request, Err(e.into()), now),
        };
        self.last_rebalance = Some(now);
        self.status.imbalance_before = plan.imbalance_before;
        self.status.imbalance_after = plan.imbalance_after;
        if plan.moves == 0 && plan.drops == 0 {
            let msg = format!(
                "placement already balanced (imbalance {:.3})",
                plan.imbalance_before
            );
            return self.rebalanced(request, Ok(msg), now);
        }
        let job = Job::Rebalance {
            request,
            started: now,
            plan: Summary {
                before: plan.imbalance_before,
                after: plan.imbalance_after,
                moves: plan.moves,
                drops: plan.drops,
            },
        };
        let change = Change::new(view, plan.assignment, "rebalance".into(), false, n);
        self.write_next(job, VecDeque::new(), Then::Drops(change), now)
    }

    /// A rebalance is over (`Ok`: what it did); a request records it and is deleted.
    fn rebalanced(
        &mut self,
        request: Option<Request>,
        outcome: Result<String, ControlError>,
        now: Instant,
    ) -> Action {
        match (request, outcome) {
            (Some(req), outcome) => {
                self.status.last_request = Some(req.id);
                self.status.last_outcome = match &outcome {
                    Ok(msg) => msg.clone(),
                    Err(e) => format!("error: {e}"),
                };
                let writes = [
                    (Pending::Ready(Write::DeleteRebalanceRequest), OnFail::End),
                    (Pending::Status, OnFail::End),
                ];
                self.tail(writes.into(), outcome.map(|_| ()), now)
            }
            (None, Ok(msg)) => {
                self.status.last_outcome = format!("automatic: {msg}");
                self.tail([(Pending::Status, OnFail::End)].into(), Ok(()), now)
            }
            (None, Err(e)) => Action::Done(Err(e)),
        }
    }

    /// Step 3 of a change: once every live attention node runs the new version, drop the old
    /// copies.
    fn try_cleanup(&mut self, view: &ClusterView, now: Instant) -> Action {
        let Some(c) = &self.cleanup else {
            return Action::Done(Ok(()));
        };
        if view.version() != c.version {
            self.cleanup = None;
            return Action::Done(Ok(()));
        }
        if view
            .attention_nodes
            .iter()
            .any(|a| a.placement_version < c.version)
        {
            return Action::Done(Ok(()));
        }
        let sets: BTreeMap<&str, &ExpertSet> = c
            .sets
            .iter()
            .map(|a| (a.name.as_str(), &a.experts))
            .collect();
        let none = ExpertSet::none(self.config.num_experts);
        let writes = view
            .expert_nodes
            .iter()
            .filter_map(|rec| {
                let target = sets.get(rec.name.as_str()).copied().unwrap_or(&none);
                assign(view, &rec.name, target, false)
            })
            .map(|p| (p, OnFail::End))
            .collect();
        self.write_next(Job::Plain, writes, Then::CleanedUp, now)
    }
}
