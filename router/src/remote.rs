//! [`RemoteExperts`]: the routed experts of a model served by expert nodes. It works on host
//! rows (`f32`, `[rows × hidden]`) and knows no compute backend: the attention side wraps it
//! in its `ExpertExecutor` contract (`cli/src/adapters.rs`), moving tensors to and from the
//! host around [`RemoteExperts::submit`].
//!
//! One layer step: the rows go to the host, [`crate::dispatch::Dispatch`] (the step's decisions,
//! without I/O) plans every (row, expert) pair onto a node, and this file's async shell sends
//! one request per destination node concurrently, each under a deadline, and feeds the outcomes
//! back. A node that fails (unreachable, too slow, refuses) is marked down for a while and its
//! pairs are planned again onto replicas; pairs already answered are kept. The result is the
//! sum of the nodes' per-row partial sums taken in a fixed order — attempt, then ascending node
//! index — so it never depends on which reply arrived first.
//!
//! The placement is versioned: [`RemoteExperts::set_placement`] publishes a new one, which
//! becomes active between steps (the engine brackets each step with `begin_step`/`end_step`),
//! never within one — so the control plane can drop an expert's old copy once every attention
//! node reports the new version. The one exception is failover: when no live node holds an
//! expert a step needs, the step waits (up to `failover_wait`) for a newer placement and sends
//! only the unanswered pairs by it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use myriad_transport::{Connection, Connector, Frame, TransportError};
use myriad_wire::{
    ErrorReply, ExpertRequest, ExpertResponse, FrameKind, HEADER_LEN, Hello, HelloAck, Limits,
    Message, Routes, TensorDtype, WireTensor,
};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::dispatch::{Dispatch, Health, NodeFailure, Route, Step};
use crate::error::{RouterError, StepError};
use crate::stats::{Stats, StatsSnapshot};
use myriad_wire::placement::Placement;

/// Router settings.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Longest wait for one node's reply to one layer step.
    pub deadline: Duration,
    /// Longest wait to (re)connect to a node.
    pub connect_timeout: Duration,
    /// Planning rounds per layer step before giving up (the first plus failovers).
    pub max_attempts: usize,
    /// How long a failed node is left out of plans before it is tried again.
    pub down_for: Duration,
    /// Decoder limits for replies.
    pub limits: Limits,
    /// How long a step waits for a newer placement when no live node holds an expert it needs
    /// (the control plane is reassigning a dead node's experts). Zero: fail at once.
    pub failover_wait: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            deadline: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_attempts: 3,
            down_for: Duration::from_secs(2),
            limits: Limits::default(),
            failover_wait: Duration::ZERO,
        }
    }
}

/// When a published placement may become active.
struct Switch {
    in_step: bool,
    pending: Option<Arc<Route>>,
    /// When the running step began.
    began: Option<Instant>,
    /// The last steps: (end time, duration, placement version), oldest first.
    recent: std::collections::VecDeque<StepRecord>,
}

/// One finished forward step, as the router saw it.
#[derive(Clone, Copy, Debug)]
pub struct StepRecord {
    pub ended: Instant,
    pub duration: Duration,
    pub placement_version: u64,
}

/// Steps remembered for [`RemoteExperts::recent_steps`].
const RECENT_STEPS: usize = 4096;

struct Inner {
    connector: Arc<dyn Connector>,
    /// The placement steps use; changes only between steps.
    active: RwLock<Arc<Route>>,
    switch: Mutex<Switch>,
    /// The newest placement published (what a failing step may wait for).
    published: watch::Sender<Arc<Route>>,
    /// The version of the active placement, for whoever reports it to the control plane.
    applied: watch::Sender<u64>,
    /// Connections by address, kept across placement versions.
    conns: Mutex<HashMap<String, Arc<dyn Connection>>>,
    /// Nodes (by name) left out of plans until the given time.
    down_until: Mutex<HashMap<String, Instant>>,
    /// Nodes (by name) whose last call failed in transport (no answer); cleared by a success.
    unreachable: Mutex<std::collections::BTreeSet<String>>,
    /// Pairs sent to each node (by name) and not yet answered (load for replica choice).
    queued: Mutex<HashMap<String, usize>>,
    /// Tokens routed to each expert of each layer since start, `[layer * experts + expert]`.
    expert_tokens: Vec<AtomicU64>,
    next_id: AtomicU64,
    config: RouterConfig,
    hidden: usize,
    layers: usize,
    stats: Stats,
}

/// Routed experts on expert nodes.
pub struct RemoteExperts {
    inner: Arc<Inner>,
    runtime: Handle,
}

impl RemoteExperts {
    /// A router over `placement` (version 0), dialling with `connector` and running its I/O on
    /// `runtime`. `hidden` and `layers` are the model's (checked against every reply).
    pub fn new(
        placement: Placement,
        connector: Arc<dyn Connector>,
        runtime: Handle,
        hidden: usize,
        layers: usize,
        config: RouterConfig,
    ) -> Self {
        Self::with_version(0, placement, connector, runtime, hidden, layers, config)
    }

    /// As [`Self::new`], starting at placement `version`.
    pub fn with_version(
        version: u64,
        placement: Placement,
        connector: Arc<dyn Connector>,
        runtime: Handle,
        hidden: usize,
        layers: usize,
        config: RouterConfig,
    ) -> Self {
        let experts = placement.num_experts();
        let route = Arc::new(Route { version, placement });
        let inner = Inner {
            connector,
            active: RwLock::new(route.clone()),
            switch: Mutex::new(Switch {
                in_step: false,
                pending: None,
                began: None,
                recent: std::collections::VecDeque::new(),
            }),
            published: watch::Sender::new(route),
            applied: watch::Sender::new(version),
            conns: Mutex::new(HashMap::new()),
            down_until: Mutex::new(HashMap::new()),
            unreachable: Mutex::new(std::collections::BTreeSet::new()),
            queued: Mutex::new(HashMap::new()),
            expert_tokens: (0..layers * experts).map(|_| AtomicU64::new(0)).collect(),
            next_id: AtomicU64::new(1),
            config,
            hidden,
            layers,
            stats: Stats::default(),
        };
        RemoteExperts {
            inner: Arc::new(inner),
            runtime,
        }
    }

    /// The active placement.
    pub fn placement(&self) -> Placement {
        self.inner.active().placement.clone()
    }

    /// The version of the active placement.
    pub fn placement_version(&self) -> u64 {
        self.inner.active().version
    }

    /// Follows the active placement version (it changes between steps).
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.inner.applied.subscribe()
    }

    /// Publishes placement `version`. It becomes active at once when no step is running, else
    /// when the running step ends. Versions at or below the newest published are ignored;
    /// a placement for another number of experts is refused.
    pub fn set_placement(&self, version: u64, placement: Placement) -> Result<(), RouterError> {
        let inner = &self.inner;
        let experts = inner.expert_tokens.len() / inner.layers.max(1);
        if placement.num_experts() != experts {
            return Err(RouterError::Placement(
                myriad_wire::placement::PlacementError::Invalid {
                    origin: format!("placement version {version}"),
                    detail: format!(
                        "describes {} experts, the model has {experts}",
                        placement.num_experts()
                    ),
                },
            ));
        }
        if version <= inner.published.borrow().version {
            return Ok(());
        }
        let route = Arc::new(Route { version, placement });
        let mut sw = inner.switch.lock().unwrap_or_else(|e| e.into_inner());
        inner.published.send_replace(route.clone());
        if sw.in_step {
            sw.pending = Some(route);
        } else {
            inner.activate(route);
        }
        Ok(())
    }

    /// Nodes of the active placement whose last call got no answer (none succeeded since):
    /// what the control plane is told, so it can replace a node that is registered but hung.
    pub fn unreachable_nodes(&self) -> Vec<String> {
        let placement = self.placement();
        self.inner
            .unreachable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|n| placement.node(n).is_some())
            .cloned()
            .collect()
    }

    /// The last few thousand forward steps, oldest first.
    pub fn recent_steps(&self) -> Vec<StepRecord> {
        let sw = self.inner.switch.lock().unwrap_or_else(|e| e.into_inner());
        sw.recent.iter().copied().collect()
    }

    /// Tokens routed to each expert of each layer since start, `[layer][expert]`.
    pub fn expert_tokens(&self) -> Vec<Vec<u64>> {
        let layers = self.inner.layers.max(1);
        let experts = self.inner.expert_tokens.len() / layers;
        self.inner
            .expert_tokens
            .chunks(experts.max(1))
            .map(|c| c.iter().map(|t| t.load(Ordering::Relaxed)).collect())
            .collect()
    }

    /// Dials every node of the active placement, checks that it serves this model
    /// (`fingerprint`) and holds at least what the placement assigns it. Blocks; call from
    /// outside the runtime.
    pub fn handshake(&self, client: &str, fingerprint: u64) -> Result<Vec<HelloAck>, RouterError> {
        let inner = self.inner.clone();
        let route = inner.active();
        let client = client.to_string();
        self.runtime.block_on(async move {
            let mut acks = Vec::new();
            for node in route.placement.nodes() {
                let fail = |reason: String| RouterError::Handshake {
                    node: node.name.clone(),
                    addr: node.addr.clone(),
                    reason,
                };
                let conn = inner
                    .conn(&node.addr)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                let hello = Hello {
                    client: client.clone(),
                    model_fingerprint: fingerprint,
                };
                let reply = conn
                    .call(
                        Frame::new(FrameKind::Hello, hello.encode()),
                        inner.config.connect_timeout,
                    )
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                if reply.kind != FrameKind::HelloAck {
                    return Err(fail(reply_error(&reply, &inner.config.limits)));
                }
                let ack = HelloAck::decode(&reply.payload, &inner.config.limits)
                    .map_err(|e| fail(e.to_string()))?;
                if ack.model_fingerprint != fingerprint {
                    return Err(fail(format!(
                        "serves another model (fingerprint {:x}, expected {fingerprint:x})",
                        ack.model_fingerprint
                    )));
                }
                if let Some(e) = node
                    .experts
                    .iter()
                    .find(|e| ack.held.binary_search(&(*e as u32)).is_err())
                {
                    return Err(fail(format!(
                        "does not hold expert {e}, which the placement assigns it"
                    )));
                }
                acks.push(ack);
            }
            Ok(acks)
        })
    }

    /// Counters since start.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }
}

impl Inner {
    fn active(&self) -> Arc<Route> {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn activate(&self, route: Arc<Route>) {
        let version = route.version;
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = route;
        self.applied.send_replace(version);
        self.stats.record_switch();
    }

    fn begin_step(&self) {
        let mut sw = self.switch.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(route) = sw.pending.take() {
            self.activate(route);
        }
        sw.in_step = true;
        sw.began = Some(Instant::now());
    }

    fn end_step(&self) {
        let mut sw = self.switch.lock().unwrap_or_else(|e| e.into_inner());
        sw.in_step = false;
        if let Some(t0) = sw.began.take() {
            if sw.recent.len() == RECENT_STEPS {
                sw.recent.pop_front();
            }
            let now = Instant::now();
            let version = self.active().version;
            sw.recent.push_back(StepRecord {
                ended: now,
                duration: now - t0,
                placement_version: version,
            });
        }
        if let Some(route) = sw.pending.take() {
            self.activate(route);
        }
    }

    fn usable(&self, placement: &Placement) -> Vec<bool> {
        let now = Instant::now();
        let down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        placement
            .nodes()
            .iter()
            .map(|n| down.get(&n.name).is_none_or(|t| now >= *t))
            .collect()
    }

    fn queued(&self, placement: &Placement) -> Vec<usize> {
        let q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        placement
            .nodes()
            .iter()
            .map(|n| q.get(&n.name).copied().unwrap_or(0))
            .collect()
    }

    fn add_queued(&self, node: &str, pairs: isize) {
        let mut q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        let v = q.entry(node.to_string()).or_insert(0);
        *v = v.saturating_add_signed(pairs);
    }

    fn mark_down(&self, name: &str, addr: &str) {
        self.unreachable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        down.insert(name.to_string(), Instant::now() + self.config.down_for);
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.remove(addr);
    }

    fn mark_up(&self, name: &str) {
        self.unreachable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        down.remove(name);
    }

    /// A live connection to `addr`, dialled if needed.
    async fn conn(&self, addr: &str) -> Result<Arc<dyn Connection>, TransportError> {
        let cached = {
            let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.get(addr).cloned()
        };
        if let Some(c) = cached
            && !c.is_closed()
        {
            return Ok(c);
        }
        let c =
            match tokio::time::timeout(self.config.connect_timeout, self.connector.connect(addr))
                .await
            {
                Ok(r) => r?,
                Err(_) => {
                    return Err(TransportError::Timeout {
                        peer: addr.to_string(),
                        after: self.config.connect_timeout,
                    });
                }
            };
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Sends one sub-batch to the node at `addr` and returns its per-row partial sums.
    async fn send(
        &self,
        name: &str,
        addr: &str,
        layer: usize,
        rows: usize,
        hidden: Vec<f32>,
        routes: Routes,
    ) -> Result<Vec<f32>, NodeFailure> {
        let conn = self.conn(addr).await.map_err(NodeFailure::Transport)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pairs = routes.pairs();
        let request = ExpertRequest {
            id,
            layer: layer as u32,
            hidden: WireTensor::from_f32(
                rows as u32,
                self.hidden as u32,
                &hidden,
                TensorDtype::F32,
            ),
            routes,
        };
        let payload = request.encode();
        let sent = HEADER_LEN + payload.len();
        let t0 = Instant::now();
        let reply = conn
            .call(
                Frame::new(FrameKind::ExpertRequest, payload),
                self.config.deadline,
            )
            .await
            .map_err(NodeFailure::Transport)?;
        self.stats.record_call(
            name,
            pairs,
            sent,
            HEADER_LEN + reply.payload.len(),
            t0.elapsed(),
        );
        match reply.kind {
            FrameKind::ExpertResponse => {
                let r = ExpertResponse::decode(&reply.payload, &self.config.limits)
                    .map_err(|e| NodeFailure::Protocol(e.to_string()))?;
                if r.id != id
                    || r.output.rows as usize != rows
                    || r.output.cols as usize != self.hidden
                {
                    return Err(NodeFailure::Protocol(format!(
                        "reply {} of {}x{} does not answer request {id} of {rows}x{}",
                        r.id, r.output.rows, r.output.cols, self.hidden
                    )));
                }
                Ok(r.output.to_f32())
            }
            FrameKind::Error => Err(NodeFailure::Refused(reply_error(
                &reply,
                &self.config.limits,
            ))),
            other => Err(NodeFailure::Protocol(format!("unexpected {other:?} reply"))),
        }
    }

    /// A placement newer than `version`, waiting for one until `deadline`.
    async fn newer_route(&self, version: u64, deadline: Instant) -> Option<Arc<Route>> {
        let mut rx = self.published.subscribe();
        loop {
            {
                let r = rx.borrow_and_update();
                if r.version > version {
                    return Some(r.clone());
                }
            }
            match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }

    /// Drives one layer step's [`Dispatch`]: sends its rounds, feeds back replies, placement
    /// changes and failover waits, and records node health and counters.
    async fn dispatch(
        self: Arc<Self>,
        layer: usize,
        x: Vec<f32>,
        routes: Routes,
    ) -> Result<Vec<f32>, StepError> {
        let h = self.hidden;
        let failover_until = Instant::now() + self.config.failover_wait;
        let mut d = Dispatch::new(layer, h, routes, self.active(), self.config.max_attempts);
        let mut step = self.plan_round(&mut d);
        loop {
            step = match step {
                Step::Done(result) => return result,
                Step::Replan => {
                    self.stats.record_failover();
                    self.plan_round(&mut d)
                }
                Step::AwaitPlacement { newer_than } => {
                    match self.newer_route(newer_than, failover_until).await {
                        Some(route) => {
                            d.on_placement(route);
                            self.plan_round(&mut d)
                        }
                        None => d.on_no_placement(),
                    }
                }
                Step::Send { row_visits } => {
                    self.stats.record_plan(row_visits, h);
                    self.send_round(layer, &x, &mut d).await?;
                    let next = d.end_round();
                    if matches!(next, Step::AwaitPlacement { .. }) {
                        // The round failed over and used the last attempt.
                        self.stats.record_failover();
                    }
                    next
                }
            };
        }
    }

    fn plan_round(&self, d: &mut Dispatch) -> Step {
        let placement = &d.route().placement;
        let usable = self.usable(placement);
        let queued = self.queued(placement);
        d.plan_round(&usable, &queued)
    }

    /// Sends every batch of the round and feeds each outcome to `d` as it arrives. A newer
    /// placement that drops a node being waited on means the control plane found it dead (its
    /// lease lapsed): that call is abandoned at once rather than at its deadline.
    async fn send_round(
        self: &Arc<Self>,
        layer: usize,
        x: &[f32],
        d: &mut Dispatch,
    ) -> Result<(), StepError> {
        let h = self.hidden;
        let mut set = JoinSet::new();
        let mut tasks = Vec::new();
        let mut task_batch = HashMap::new();
        for (i, b) in d.round().iter().enumerate() {
            let mut xs = Vec::with_capacity(b.rows.len() * h);
            for &r in &b.rows {
                xs.extend_from_slice(&x[r * h..(r + 1) * h]);
            }
            let queued = Queued::new(self.clone(), &b.name, b.routes.pairs());
            let (name, addr, routes) = (b.name.clone(), b.addr.clone(), b.routes.clone());
            let inner = self.clone();
            let rows = b.rows.len();
            let task = set.spawn(async move {
                let r = inner.send(&name, &addr, layer, rows, xs, routes).await;
                drop(queued);
                r
            });
            task_batch.insert(task.id(), i);
            tasks.push(task);
        }
        let mut newest = self.published.subscribe();
        newest.borrow_and_update();
        loop {
            let (i, outcome) = tokio::select! {
                done = set.join_next_with_id() => match done {
                    None => return Ok(()),
                    Some(Ok((id, r))) => (task_batch[&id], r),
                    Some(Err(e)) if e.is_cancelled() => {
                        let i = task_batch[&e.id()];
                        let peer = d.round()[i].addr.clone();
                        (i, Err(NodeFailure::Transport(TransportError::Closed {
                            peer,
                            reason: "the control plane removed the node (its lease lapsed)".into(),
                        })))
                    }
                    Some(Err(e)) => {
                        return Err(StepError::Remote {
                            layer,
                            reason: format!("dispatch task failed: {e}"),
                        });
                    }
                },
                Ok(()) = newest.changed() => {
                    let now = newest.borrow_and_update().clone();
                    for i in d.dropped_by(&now.placement) {
                        tasks[i].abort();
                    }
                    continue;
                }
            };
            match d.on_reply(i, outcome) {
                Health::Up { name } => self.mark_up(&name),
                Health::Down { name, addr } => self.mark_down(&name, &addr),
                Health::Unchanged => {}
            }
        }
    }
}

/// Pairs in flight to one node, counted while the request lives (however it ends).
struct Queued {
    inner: Arc<Inner>,
    node: String,
    pairs: isize,
}

impl Queued {
    fn new(inner: Arc<Inner>, node: &str, pairs: usize) -> Self {
        let pairs = pairs as isize;
        inner.add_queued(node, pairs);
        Queued {
            inner,
            node: node.to_string(),
            pairs,
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.inner.add_queued(&self.node, -self.pairs);
    }
}

/// The message of an Error reply (or why it could not be read).
fn reply_error(reply: &Frame, limits: &Limits) -> String {
    match reply.kind {
        FrameKind::Error => match ErrorReply::decode(&reply.payload, limits) {
            Ok(e) => format!("{:?}: {}", e.code, e.message),
            Err(e) => format!("unreadable error reply: {e}"),
        },
        other => format!("unexpected {other:?} reply"),
    }
}

/// A layer step in flight on the expert nodes.
pub struct Pending {
    task: tokio::task::JoinHandle<Result<Vec<f32>, StepError>>,
    runtime: Handle,
    layer: usize,
}

impl Pending {
    /// Blocks until the step's routed output, `[rows × hidden]` on the host, is combined.
    /// Call from outside the router's runtime.
    pub fn wait(self) -> Result<Vec<f32>, StepError> {
        let Pending {
            task,
            runtime,
            layer,
        } = self;
        runtime.block_on(task).map_err(|e| StepError::Remote {
            layer,
            reason: format!("dispatch task failed: {e}"),
        })?
    }
}

impl RemoteExperts {
    /// Marks a forward step's start: a placement published since the last step becomes active.
    pub fn begin_step(&self) {
        self.inner.begin_step();
    }

    /// Marks a forward step's end (and records its duration).
    pub fn end_step(&self) {
        self.inner.end_step();
    }

    /// The model's hidden size, the width of every row sent and received.
    pub fn hidden(&self) -> usize {
        self.inner.hidden
    }

    /// Starts layer `layer`'s routed experts for the host rows `x` (`[rows × hidden]`, one
    /// per row of `routes`) and returns at once; [`Pending::wait`] gives the result.
    pub fn submit(&self, layer: usize, x: Vec<f32>, routes: &Routes) -> Result<Pending, StepError> {
        let inner = &self.inner;
        if layer >= inner.layers {
            return Err(StepError::NoSuchLayer {
                layer,
                layers: inner.layers,
            });
        }
        let rows = routes.rows();
        if x.len() != rows * inner.hidden {
            return Err(StepError::Remote {
                layer,
                reason: format!(
                    "{} hidden values for {rows} routed rows of a model of width {}",
                    x.len(),
                    inner.hidden
                ),
            });
        }
        let experts = inner.expert_tokens.len() / inner.layers.max(1);
        for &e in routes.experts() {
            if let Some(t) = inner.expert_tokens.get(layer * experts + e as usize) {
                t.fetch_add(1, Ordering::Relaxed);
            }
        }
        let task = self
            .runtime
            .spawn(inner.clone().dispatch(layer, x, routes.clone()));
        Ok(Pending {
            task,
            runtime: self.runtime.clone(),
            layer,
        })
    }
}
