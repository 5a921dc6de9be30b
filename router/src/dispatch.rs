//! [`Dispatch`]: the decisions of one layer step's dispatch, with no I/O, no clock and no
//! runtime (quinn-proto's shape): which rows go to which node in each round, what a reply or
//! a failure changes, when to retry on replicas, when to wait for a newer placement and when
//! to give up, and the fixed-order combine. `remote.rs` drives it: it sends the rounds, feeds
//! the replies and placements back, and keeps node health between steps.
//!
//! A step is a sequence of rounds. A round plans the unanswered (row, expert) pairs over the
//! placement's usable nodes (minus nodes that refused within this step) and sends one batch
//! per node; a failed batch's pairs go into the next round. After `max_attempts` rounds, or
//! when some expert has no usable holder, the step waits for a newer placement (the control
//! plane failing a dead node over), which restarts the count; without one it fails.

use std::sync::Arc;

use myriad_transport::TransportError;
use myriad_wire::{Placement, Routes};

use crate::error::StepError;
use crate::plan::{PlanError, plan};

/// One placement version.
#[derive(Debug)]
pub struct Route {
    pub version: u64,
    pub placement: Placement,
}

/// Why one node's part of a layer step failed.
#[derive(Debug)]
pub enum NodeFailure {
    /// No answer: the connection failed, timed out or closed. The node is marked down.
    Transport(TransportError),
    /// The node answered with an error. It is not asked again within this step.
    Refused(String),
    /// The node answered something that does not answer the request. Likewise.
    Protocol(String),
}

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeFailure::Transport(e) => write!(f, "{e}"),
            NodeFailure::Refused(m) => write!(f, "refused: {m}"),
            NodeFailure::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

/// One node's share of a round.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The node's index in the round's placement.
    pub node: usize,
    pub name: String,
    pub addr: String,
    /// Rows of the step's batch (original indices, ascending) whose hidden vectors to send.
    pub rows: Vec<usize>,
    /// Row `i`'s pairs on this node, in route order.
    pub routes: Routes,
}

/// What the driver does next.
#[derive(Debug)]
pub enum Step {
    /// Send every batch of [`Dispatch::round`] (this many row visits), feed each outcome to
    /// [`Dispatch::on_reply`], then call [`Dispatch::end_round`].
    Send { row_visits: usize },
    /// Wait for a placement newer than `newer_than` (up to the failover wait), then call
    /// [`Dispatch::on_placement`] or, if none came, [`Dispatch::on_no_placement`].
    AwaitPlacement { newer_than: u64 },
    /// Plan again (a round failed over; call [`Dispatch::plan_round`]).
    Replan,
    /// The step's result: the routed output, `[rows × hidden]`, or why it failed.
    Done(Result<Vec<f32>, StepError>),
}

/// What a reply says about a node's health, for the driver's records across steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// It answered: clear any down mark.
    Up { name: String },
    /// It did not answer: leave it out of plans for a while and drop its connection.
    Down { name: String, addr: String },
    /// It refused or garbled this request: nothing to record beyond this step.
    Unchanged,
}

/// Why the step waits for a newer placement.
#[derive(Clone, Copy, Debug)]
enum Waiting {
    NoHolder { expert: u32 },
    Exhausted,
}

/// One layer step's dispatch state.
#[derive(Debug)]
pub struct Dispatch {
    layer: usize,
    hidden: usize,
    rows: usize,
    max_attempts: usize,
    route: Arc<Route>,
    /// Original row of each row of `work`.
    work_rows: Vec<usize>,
    /// The pairs still to be answered.
    work: Routes,
    /// (attempt, node index in that attempt's placement, original rows, partial sums).
    partials: Vec<(usize, usize, Vec<usize>, Vec<f32>)>,
    failures: Vec<String>,
    /// Nodes (by name) that refused this step's requests: not asked again within it.
    excluded: Vec<String>,
    attempt: usize,
    attempts_left: usize,
    round: Vec<Batch>,
    /// Rows of the round that failed, as original rows and their pairs.
    retry_rows: Vec<usize>,
    retry: Routes,
    waiting: Option<Waiting>,
}

impl Dispatch {
    /// A step over `routes` (one row per hidden vector) for `layer`, on placement `route`.
    pub fn new(
        layer: usize,
        hidden: usize,
        routes: Routes,
        route: Arc<Route>,
        max_attempts: usize,
    ) -> Self {
        let rows = routes.rows();
        Dispatch {
            layer,
            hidden,
            rows,
            max_attempts: max_attempts.max(1),
            route,
            work_rows: (0..rows).collect(),
            work: routes,
            partials: Vec::new(),
            failures: Vec::new(),
            excluded: Vec::new(),
            attempt: 0,
            attempts_left: max_attempts.max(1),
            round: Vec::new(),
            retry_rows: Vec::new(),
            retry: Routes::new(),
            waiting: None,
        }
    }

    /// The placement this step plans over.
    pub fn route(&self) -> &Arc<Route> {
        &self.route
    }

    /// The batches of the current round, in ascending node order.
    pub fn round(&self) -> &[Batch] {
        &self.round
    }

    /// Plans a round. `usable[n]`: node `n` of the placement is not marked down; `queued[n]`:
    /// pairs already in flight to it (load for the choice between replicas).
    pub fn plan_round(&mut self, usable: &[bool], queued: &[usize]) -> Step {
        let nodes = self.route.placement.nodes();
        let usable: Vec<bool> = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                usable.get(i).copied().unwrap_or(false) && !self.excluded.contains(&node.name)
            })
            .collect();
        let planned = match plan(&self.work, &self.route.placement, &usable, queued) {
            Ok(p) => p,
            Err(PlanError::NoHolder { expert }) => {
                self.waiting = Some(Waiting::NoHolder { expert });
                return Step::AwaitPlacement {
                    newer_than: self.route.version,
                };
            }
        };
        let row_visits = planned.row_visits();
        self.round = planned
            .batches
            .into_iter()
            .map(|b| {
                let node = &nodes[b.node];
                Batch {
                    node: b.node,
                    name: node.name.clone(),
                    addr: node.addr.clone(),
                    rows: b.rows.iter().map(|&i| self.work_rows[i]).collect(),
                    routes: b.routes,
                }
            })
            .collect();
        self.retry_rows.clear();
        self.retry = Routes::new();
        Step::Send { row_visits }
    }

    /// The outcome of batch `i` of the current round; `partial` holds its rows' partial sums.
    pub fn on_reply(&mut self, i: usize, outcome: Result<Vec<f32>, NodeFailure>) -> Health {
        let Some(b) = self.round.get(i) else {
            return Health::Unchanged;
        };
        match outcome {
            Ok(partial) => {
                self.partials
                    .push((self.attempt, b.node, b.rows.clone(), partial));
                Health::Up {
                    name: b.name.clone(),
                }
            }
            Err(f) => {
                self.failures.push(format!("{} ({}): {f}", b.name, b.addr));
                for (k, &row) in b.rows.iter().enumerate() {
                    let (e, w) = b.routes.row(k);
                    self.retry_rows.push(row);
                    self.retry.push_row(e, w);
                }
                match f {
                    NodeFailure::Transport(_) => Health::Down {
                        name: b.name.clone(),
                        addr: b.addr.clone(),
                    },
                    NodeFailure::Refused(_) | NodeFailure::Protocol(_) => {
                        self.excluded.push(b.name.clone());
                        Health::Unchanged
                    }
                }
            }
        }
    }

    /// Batches of the current round whose node `placement` no longer has: the control plane
    /// found it dead, so the driver stops waiting for them (and reports them closed).
    pub fn dropped_by(&self, placement: &Placement) -> Vec<usize> {
        self.round
            .iter()
            .enumerate()
            .filter(|(_, b)| placement.node(&b.name).is_none())
            .map(|(i, _)| i)
            .collect()
    }

    /// Every batch of the round has its outcome: done, another round, or a wait for a newer
    /// placement once the attempts are used up.
    pub fn end_round(&mut self) -> Step {
        self.round.clear();
        if self.retry_rows.is_empty() {
            return Step::Done(Ok(self.combine()));
        }
        self.work_rows = std::mem::take(&mut self.retry_rows);
        self.work = std::mem::take(&mut self.retry);
        self.attempt += 1;
        self.attempts_left -= 1;
        if self.attempts_left == 0 {
            self.waiting = Some(Waiting::Exhausted);
            return Step::AwaitPlacement {
                newer_than: self.route.version,
            };
        }
        Step::Replan
    }

    /// A newer placement arrived while waiting: plan over it with a fresh count of attempts.
    pub fn on_placement(&mut self, route: Arc<Route>) {
        self.route = route;
        self.excluded.clear();
        self.attempts_left = self.max_attempts;
        self.waiting = None;
    }

    /// No newer placement came within the failover wait: the step fails, saying why.
    pub fn on_no_placement(&mut self) -> Step {
        let layer = self.layer;
        Step::Done(Err(match self.waiting.take() {
            Some(Waiting::NoHolder { expert }) => StepError::Unavailable {
                layer,
                expert,
                reason: if self.failures.is_empty() {
                    "no expert node that holds it is reachable".to_string()
                } else {
                    format!(
                        "every node that holds it failed: {}",
                        self.failures.join("; ")
                    )
                },
            },
            Some(Waiting::Exhausted) | None => StepError::Remote {
                layer,
                reason: self.failures.join("; "),
            },
        }))
    }

    /// Sums the partial results in (attempt, node) order into `[rows, hidden]`, so the result
    /// never depends on which reply came first.
    fn combine(&mut self) -> Vec<f32> {
        let (n, h) = (self.rows, self.hidden);
        let mut partials = std::mem::take(&mut self.partials);
        partials.sort_by_key(|(attempt, node, _, _)| (*attempt, *node));
        let mut out = vec![0f32; n * h];
        for (_, _, rows, p) in &partials {
            for (i, &r) in rows.iter().enumerate() {
                for (o, v) in out[r * h..(r + 1) * h]
                    .iter_mut()
                    .zip(&p[i * h..(i + 1) * h])
                {
                    *o += v;
                }
            }
        }
        out
    }
}
