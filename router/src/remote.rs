//! [`RemoteExperts`]: the routed experts of a model served by expert nodes, behind the same
//! `ExpertExecutor` contract the in-process shard implements.
//!
//! One layer step: the rows go to the host, [`crate::plan`] assigns every (row, expert) pair to
//! a node, one request per destination node is sent concurrently, each under a deadline. A node
//! that fails (unreachable, too slow, refuses) is marked down for a while and its pairs are
//! planned again onto replicas; pairs already answered are kept. The result is the sum of the
//! nodes' per-row partial sums taken in a fixed order — ascending node index, then attempt —
//! so it never depends on which reply arrived first.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use myriad_kernels::{Backend, Routes};
use myriad_model::moe::{ExpertError, ExpertExecutor, ExpertTicket};
use myriad_model::wire::{
    ErrorReply, ExpertRequest, ExpertResponse, FrameKind, HEADER_LEN, Hello, HelloAck, Limits,
    Message, TensorDtype, WireTensor,
};
use myriad_transport::{Connection, Connector, Frame, TransportError};
use tokio::runtime::Handle;
use tokio::task::JoinSet;

use crate::error::RouterError;
use crate::placement::Placement;
use crate::plan::plan;
use crate::stats::{Stats, StatsSnapshot};

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
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            deadline: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_attempts: 3,
            down_for: Duration::from_secs(2),
            limits: Limits::default(),
        }
    }
}

/// Why one node's part of a layer step failed.
#[derive(Debug)]
enum NodeFailure {
    Transport(TransportError),
    Refused(String),
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

struct Inner<B: Backend> {
    backend: Arc<B>,
    placement: Placement,
    connector: Arc<dyn Connector>,
    conns: Mutex<Vec<Option<Arc<dyn Connection>>>>,
    down_until: Mutex<Vec<Option<Instant>>>,
    /// Pairs sent to each node and not yet answered (load for replica choice).
    queued: Vec<AtomicUsize>,
    next_id: AtomicU64,
    config: RouterConfig,
    hidden: usize,
    layers: usize,
    stats: Stats,
}

/// Routed experts on expert nodes.
pub struct RemoteExperts<B: Backend> {
    inner: Arc<Inner<B>>,
    runtime: Handle,
}

impl<B: Backend> RemoteExperts<B> {
    /// A router over `placement`, dialling with `connector` and running its I/O on `runtime`.
    /// `hidden` and `layers` are the model's (checked against every reply).
    pub fn new(
        backend: Arc<B>,
        placement: Placement,
        connector: Arc<dyn Connector>,
        runtime: Handle,
        hidden: usize,
        layers: usize,
        config: RouterConfig,
    ) -> Self {
        let n = placement.nodes().len();
        let inner = Inner {
            backend,
            connector,
            conns: Mutex::new(vec![None; n]),
            down_until: Mutex::new(vec![None; n]),
            queued: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            next_id: AtomicU64::new(1),
            config,
            hidden,
            layers,
            stats: Stats::new(n),
            placement,
        };
        RemoteExperts {
            inner: Arc::new(inner),
            runtime,
        }
    }

    pub fn placement(&self) -> &Placement {
        &self.inner.placement
    }

    /// Dials every node, checks that it serves this model (`fingerprint`) and holds at least
    /// what the placement assigns it. Blocks; call from outside the runtime.
    pub fn handshake(&self, client: &str, fingerprint: u64) -> Result<Vec<HelloAck>, RouterError> {
        let inner = self.inner.clone();
        let client = client.to_string();
        self.runtime.block_on(async move {
            let mut acks = Vec::new();
            for (i, node) in inner.placement.nodes().iter().enumerate() {
                let fail = |reason: String| RouterError::Handshake {
                    node: node.name.clone(),
                    addr: node.addr.clone(),
                    reason,
                };
                let conn = inner.conn(i).await.map_err(|e| fail(e.to_string()))?;
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
        self.inner.stats.snapshot(&self.inner.placement)
    }
}

impl<B: Backend> Inner<B> {
    fn usable(&self) -> Vec<bool> {
        let now = Instant::now();
        let down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        down.iter().map(|d| d.is_none_or(|t| now >= t)).collect()
    }

    fn mark_down(&self, node: usize) {
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        down[node] = Some(Instant::now() + self.config.down_for);
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns[node] = None;
    }

    fn mark_up(&self, node: usize) {
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        down[node] = None;
    }

    /// A live connection to `node`, dialled if needed.
    async fn conn(&self, node: usize) -> Result<Arc<dyn Connection>, TransportError> {
        let cached = {
            let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns[node].clone()
        };
        if let Some(c) = cached
            && !c.is_closed()
        {
            return Ok(c);
        }
        let addr = self.placement.nodes()[node].addr.clone();
        let c =
            match tokio::time::timeout(self.config.connect_timeout, self.connector.connect(&addr))
                .await
            {
                Ok(r) => r?,
                Err(_) => {
                    return Err(TransportError::Timeout {
                        peer: addr,
                        after: self.config.connect_timeout,
                    });
                }
            };
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns[node] = Some(c.clone());
        Ok(c)
    }

    /// Sends one sub-batch to `node` and returns its per-row partial sums.
    async fn send(
        &self,
        node: usize,
        layer: usize,
        rows: usize,
        hidden: Vec<f32>,
        routes: Routes,
    ) -> Result<Vec<f32>, NodeFailure> {
        let conn = self.conn(node).await.map_err(NodeFailure::Transport)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
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
        self.stats
            .record_call(node, sent, HEADER_LEN + reply.payload.len(), t0.elapsed());
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

    async fn dispatch(
        self: Arc<Self>,
        layer: usize,
        x: Vec<f32>,
        routes: Routes,
    ) -> Result<Vec<f32>, ExpertError> {
        let h = self.hidden;
        let n = routes.rows();
        let mut work_rows: Vec<usize> = (0..n).collect();
        let mut work = routes;
        // (node, attempt, original rows, partial sums)
        let mut partials: Vec<(usize, usize, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        let mut excluded = vec![false; self.placement.nodes().len()];
        for attempt in 0..self.config.max_attempts.max(1) {
            let usable: Vec<bool> = self
                .usable()
                .iter()
                .zip(&excluded)
                .map(|(u, x)| *u && !x)
                .collect();
            let queued: Vec<usize> = self
                .queued
                .iter()
                .map(|q| q.load(Ordering::Relaxed))
                .collect();
            let planned = plan(&work, &self.placement, &usable, &queued).map_err(|e| {
                ExpertError::Unavailable {
                    layer,
                    expert: match e {
                        crate::plan::PlanError::NoHolder { expert } => expert,
                    },
                    reason: if failures.is_empty() {
                        "no expert node that holds it is reachable".to_string()
                    } else {
                        format!("every node that holds it failed: {}", failures.join("; "))
                    },
                }
            })?;
            self.stats.record_plan(planned.row_visits(), h);
            let mut set = JoinSet::new();
            for b in planned.batches {
                let mut xs = Vec::with_capacity(b.rows.len() * h);
                for &i in &b.rows {
                    let r = work_rows[i];
                    xs.extend_from_slice(&x[r * h..(r + 1) * h]);
                }
                let pairs = b.routes.pairs();
                self.queued[b.node].fetch_add(pairs, Ordering::Relaxed);
                let inner = self.clone();
                set.spawn(async move {
                    let rows = b.rows.len();
                    let r = inner.send(b.node, layer, rows, xs, b.routes.clone()).await;
                    inner.queued[b.node].fetch_sub(pairs, Ordering::Relaxed);
                    (b, r)
                });
            }
            let mut retry_rows = Vec::new();
            let mut retry = Routes::new();
            while let Some(done) = set.join_next().await {
                let (b, result) = done.map_err(|e| ExpertError::Remote {
                    layer,
                    reason: format!("dispatch task failed: {e}"),
                })?;
                let name = &self.placement.nodes()[b.node].name;
                match result {
                    Ok(partial) => {
                        self.mark_up(b.node);
                        partials.push((
                            b.node,
                            attempt,
                            b.rows.iter().map(|&i| work_rows[i]).collect(),
                            partial,
                        ));
                    }
                    Err(f) => {
                        failures.push(format!(
                            "{name} ({}): {f}",
                            self.placement.nodes()[b.node].addr
                        ));
                        match f {
                            NodeFailure::Transport(_) => self.mark_down(b.node),
                            NodeFailure::Refused(_) | NodeFailure::Protocol(_) => {
                                excluded[b.node] = true
                            }
                        }
                        for (i, &row) in b.rows.iter().enumerate() {
                            let (e, w) = b.routes.row(i);
                            retry_rows.push(work_rows[row]);
                            retry.push_row(e, w);
                        }
                    }
                }
            }
            if retry_rows.is_empty() {
                return Ok(combine(n, h, partials));
            }
            self.stats.record_failover();
            work_rows = retry_rows;
            work = retry;
        }
        Err(ExpertError::Remote {
            layer,
            reason: failures.join("; "),
        })
    }
}

/// Sums partial results in (node, attempt) order into `[n, h]`.
fn combine(
    n: usize,
    h: usize,
    mut partials: Vec<(usize, usize, Vec<usize>, Vec<f32>)>,
) -> Vec<f32> {
    partials.sort_by_key(|(node, attempt, _, _)| (*node, *attempt));
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
struct RemoteTicket<B: Backend> {
    task: tokio::task::JoinHandle<Result<Vec<f32>, ExpertError>>,
    runtime: Handle,
    backend: Arc<B>,
    rows: usize,
    hidden: usize,
    layer: usize,
}

impl<B: Backend> ExpertTicket<B> for RemoteTicket<B> {
    fn wait(self: Box<Self>) -> Result<B::Tensor, ExpertError> {
        let RemoteTicket {
            task,
            runtime,
            backend,
            rows,
            hidden,
            layer,
        } = *self;
        let data = runtime.block_on(task).map_err(|e| ExpertError::Remote {
            layer,
            reason: format!("dispatch task failed: {e}"),
        })??;
        Ok(backend.upload(rows, hidden, &data)?)
    }
}

impl<B: Backend> ExpertExecutor<B> for RemoteExperts<B> {
    fn run(
        &self,
        layer: usize,
        x: &B::Tensor,
        routes: &Routes,
        out: &mut B::Tensor,
    ) -> Result<(), ExpertError> {
        let (rows, _) = self.inner.backend.shape(x);
        let ticket = self.submit(
            layer,
            x,
            routes,
            self.inner.backend.zeros(rows, self.inner.hidden),
        )?;
        *out = ticket.wait()?;
        Ok(())
    }

    fn submit(
        &self,
        layer: usize,
        x: &B::Tensor,
        routes: &Routes,
        _out: B::Tensor,
    ) -> Result<Box<dyn ExpertTicket<B>>, ExpertError> {
        let inner = &self.inner;
        if layer >= inner.layers {
            return Err(ExpertError::NoSuchLayer {
                layer,
                layers: inner.layers,
            });
        }
        let (rows, cols) = inner.backend.shape(x);
        if cols != inner.hidden || routes.rows() != rows {
            return Err(ExpertError::Remote {
                layer,
                reason: format!(
                    "{rows}x{cols} hidden rows with {} routed rows for a model of width {}",
                    routes.rows(),
                    inner.hidden
                ),
            });
        }
        let host = inner.backend.download(x);
        let task = self
            .runtime
            .spawn(inner.clone().dispatch(layer, host, routes.clone()));
        Ok(Box::new(RemoteTicket {
            task,
            runtime: self.runtime.clone(),
            backend: inner.backend.clone(),
            rows,
            hidden: inner.hidden,
            layer,
        }))
    }
}
