//! How a pass carries out what [`Machine`] decided: the writes it queues (a serial or the
//! status taken only when each is handed out), what a failed write does to the rest, the stages
//! of a make-before-break change (await drops, assign, await loads, publish) and what each kind
//! of change does with its outcome (count it, save the status, answer its request).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use myriad_wire::ExpertSet;

use super::change::Change;
use super::{Action, Cleanup, LOAD_POLL, Machine, Write};
use crate::controller::ControlError;
use crate::records::{Assignment, Request};
use crate::view::ClusterView;

/// A write decided but not made yet. A serial and the status are taken only when the write is
/// handed out, so writes left unmade (an earlier one failed) use up no serial.
pub(super) enum Pending {
    Assign {
        node: String,
        experts: ExpertSet,
        urgent: bool,
    },
    Status,
    Ready(Write),
}

/// What a failed write does to the rest of the pass.
#[derive(Clone, Copy, Debug)]
pub(super) enum OnFail {
    /// The pass ends with the error.
    End,
    /// The change in progress fails with it; its job says what follows.
    FailChange,
    /// The writes after it are still made; the pass then ends with the error.
    Record,
}

/// What follows once the queued writes are made.
pub(super) enum Then {
    /// A change begins (after a failover's deletes): its nodes' drops are awaited.
    Drops(Change),
    /// Its assignments are written: its loads are awaited.
    Loads(Change),
    /// Its version is published.
    Published(Change),
    /// The old copies are unassigned.
    CleanedUp,
    Done(Result<(), ControlError>),
}

/// Why a change is made, which decides what the pass does with its outcome.
pub(super) enum Job {
    /// No change in progress (a cleanup, or what follows a change).
    Plain,
    Initial,
    Failover {
        gone: Vec<String>,
    },
    Drain {
        node: String,
    },
    Rebalance {
        /// `None`: started by the controller itself (`auto_rebalance_above`).
        request: Option<Request>,
        started: Instant,
        plan: Summary,
    },
}

/// What a rebalance reports once it is published.
pub(super) struct Summary {
    pub(super) before: f64,
    pub(super) after: f64,
    pub(super) moves: usize,
    pub(super) drops: usize,
}

pub(super) enum Stage {
    /// A write is out (`on_fail` says what its failure does); `queue` follows, then `then`.
    Writing {
        on_fail: OnFail,
        queue: VecDeque<(Pending, OnFail)>,
        then: Then,
    },
    /// A read is out: until no node of the change holds copies it was unassigned.
    AwaitingDrops {
        change: Change,
        deadline: Option<Instant>,
    },
    /// A read is out: until every node of the change reports holding its new set.
    AwaitingLoads {
        change: Change,
        deadline: Option<Instant>,
    },
}

pub(super) struct Pass {
    pub(super) job: Job,
    pub(super) stage: Stage,
}

impl Machine {
    /// The writes that end a pass, then `outcome`.
    pub(super) fn tail(
        &mut self,
        writes: VecDeque<(Pending, OnFail)>,
        outcome: Result<(), ControlError>,
        now: Instant,
    ) -> Action {
        self.write_next(Job::Plain, writes, Then::Done(outcome), now)
    }

    /// Hands out the next queued write, or goes on with `then` when none is left.
    pub(super) fn write_next(
        &mut self,
        job: Job,
        mut queue: VecDeque<(Pending, OnFail)>,
        then: Then,
        now: Instant,
    ) -> Action {
        let Some((pending, on_fail)) = queue.pop_front() else {
            return self.follow(job, then, now);
        };
        let write = match pending {
            Pending::Assign {
                node,
                experts,
                urgent,
            } => {
                self.serial += 1;
                let assignment = Assignment {
                    experts: experts.to_string(),
                    serial: self.serial,
                    urgent,
                };
                Write::PutAssignment { node, assignment }
            }
            Pending::Status => Write::SaveStatus(self.status.clone()),
            Pending::Ready(write) => write,
        };
        let stage = Stage::Writing {
            on_fail,
            queue,
            then,
        };
        self.pass = Some(Pass { job, stage });
        Action::Write(write)
    }

    pub(super) fn follow(&mut self, job: Job, then: Then, now: Instant) -> Action {
        match then {
            Then::Drops(change) => {
                if let Err(e) = change.check_registered() {
                    return self.after_change(job, Err(e), now);
                }
                let deadline = now.checked_add(self.config.load_timeout);
                // The pass's own read is the first look; later ones are fresh reads.
                let waiting = change.dropping(change.base());
                self.after_drops(job, change, waiting, deadline, now)
            }
            Then::Loads(change) => {
                let deadline = now.checked_add(self.config.load_timeout);
                let stage = Stage::AwaitingLoads { change, deadline };
                self.pass = Some(Pass { job, stage });
                Action::ReadView {
                    after: Duration::ZERO,
                }
            }
            Then::Published(change) => {
                let (version, sets) = change.into_published();
                self.cleanup = Some(Cleanup { version, sets });
                self.after_change(job, Ok(version), now)
            }
            Then::CleanedUp => {
                self.cleanup = None;
                Action::Done(Ok(()))
            }
            Then::Done(outcome) => Action::Done(outcome),
        }
    }

    /// Step 1a: no node of the change may report copies it is about to drop.
    pub(super) fn after_drops(
        &mut self,
        job: Job,
        change: Change,
        waiting: Result<Option<String>, ControlError>,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Action {
        match waiting {
            Err(e) => self.after_change(job, Err(e), now),
            Ok(None) => {
                let base = change.base();
                let writes = change
                    .targets()
                    .into_iter()
                    .filter_map(|(node, set)| assign(base, &node, &set, change.urgent()))
                    .map(|p| (p, OnFail::FailChange))
                    .collect();
                self.write_next(job, writes, Then::Loads(change), now)
            }
            Ok(Some(node)) => self.wait_or_time_out(
                job,
                Stage::AwaitingDrops { change, deadline },
                format!("expert node {node} to drop the experts it was unassigned"),
                deadline,
                now,
            ),
        }
    }

    /// Step 1b: every node of the change reports holding its new set; then step 2, publish.
    pub(super) fn after_loads(
        &mut self,
        job: Job,
        change: Change,
        waiting: Result<Option<String>, ControlError>,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Action {
        match waiting {
            Err(e) => self.after_change(job, Err(e), now),
            Ok(None) => match change.doc() {
                Err(e) => self.after_change(job, Err(e), now),
                Ok(doc) => {
                    let version = doc.version;
                    let writes = [
                        (Pending::Ready(Write::PutVersion(doc)), OnFail::FailChange),
                        (
                            Pending::Ready(Write::SetCurrent { version }),
                            OnFail::FailChange,
                        ),
                    ];
                    self.write_next(job, writes.into(), Then::Published(change), now)
                }
            },
            Ok(Some(node)) => self.wait_or_time_out(
                job,
                Stage::AwaitingLoads { change, deadline },
                format!("expert node {node} to load its experts"),
                deadline,
                now,
            ),
        }
    }

    /// A node of the change has not caught up: the change times out at `deadline` (waiting
    /// for `what`), else `stage` reads the view again after [`LOAD_POLL`].
    fn wait_or_time_out(
        &mut self,
        job: Job,
        stage: Stage,
        what: String,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Action {
        if deadline.is_some_and(|d| now >= d) {
            let e = ControlError::Timeout {
                what,
                after: self.config.load_timeout,
            };
            return self.after_change(job, Err(e), now);
        }
        self.pass = Some(Pass { job, stage });
        Action::ReadView { after: LOAD_POLL }
    }

    /// A change is published (`Ok`: its version) or failed; its job records it.
    pub(super) fn after_change(
        &mut self,
        job: Job,
        result: Result<u64, ControlError>,
        now: Instant,
    ) -> Action {
        let status = (Pending::Status, OnFail::End);
        match (job, result) {
            (Job::Plain, result) => Action::Done(result.map(|_| ())),
            (Job::Initial, Ok(_)) => self.tail([status].into(), Ok(()), now),
            (Job::Failover { gone }, Ok(_)) => {
                self.status.failovers += 1;
                self.status.last_outcome = format!("failed over {}", gone.join(","));
                self.tail([status].into(), Ok(()), now)
            }
            (Job::Initial | Job::Failover { .. }, Err(e)) => Action::Done(Err(e)),
            (Job::Drain { node }, result) => {
                let delete = Pending::Ready(Write::DeleteDrainRequest { node: node.clone() });
                match result {
                    Ok(_) => {
                        self.status.drains += 1;
                        self.status.last_outcome = format!("drained {node}");
                        let writes = [(Pending::Status, OnFail::Record), (delete, OnFail::End)];
                        self.tail(writes.into(), Ok(()), now)
                    }
                    Err(e) => self.tail([(delete, OnFail::End)].into(), Err(e), now),
                }
            }
            (
                Job::Rebalance {
                    request,
                    started,
                    plan,
                },
                result,
            ) => {
                let outcome = result.map(|version| {
                    let secs = now.saturating_duration_since(started).as_secs_f64();
                    self.status.rebalances += 1;
                    self.status.rebalance_seconds_total += secs;
                    self.status.last_rebalance_seconds = secs;
                    format!(
                        "version {version}: imbalance {:.3} -> {:.3}, {} copies added, {} \
                         dropped, {secs:.2}s",
                        plan.before, plan.after, plan.moves, plan.drops
                    )
                });
                self.rebalanced(request, outcome, now)
            }
        }
    }
}

/// The write that makes `node` assigned `set`, unless `view` shows it assigned just that.
pub(super) fn assign(
    view: &ClusterView,
    node: &str,
    set: &ExpertSet,
    urgent: bool,
) -> Option<Pending> {
    let spec = set.to_string();
    if view
        .assignments
        .get(node)
        .is_some_and(|a| a.experts == spec)
    {
        return None;
    }
    Some(Pending::Assign {
        node: node.to_string(),
        experts: set.clone(),
        urgent,
    })
}
