//! The expert node's request handler: answers the handshake and pings, and serves expert
//! requests — decode, check against this node's shard (layer, width, every expert held), run
//! the grouped experts on a blocking thread, reply with the per-row sums. Anything it cannot
//! serve gets an error reply that names the problem; it keeps no per-sequence state.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use myriad_kernels::Backend;
use myriad_model::moe::ExpertExecutor;
use myriad_transport::{BoxFuture, Frame, Handler};
use myriad_wire::{
    ErrorCode, ErrorReply, ExpertRequest, ExpertResponse, FrameKind, Hello, HelloAck, Limits,
    Message, Ping, Pong, WireTensor,
};

use crate::shard::ExpertShard;

/// What a node tells clients about itself.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub name: String,
    pub model_fingerprint: u64,
    pub num_layers: usize,
    pub num_experts: usize,
    pub hidden: usize,
}

struct Inner<B: Backend> {
    shard: Arc<ExpertShard<B>>,
    id: NodeIdentity,
    limits: Limits,
    /// (token, expert) pairs served per layer and expert, `[layer * experts + expert]`.
    served: Vec<AtomicU64>,
    requests: AtomicU64,
}

/// Serves one expert shard over any transport.
pub struct ExpertService<B: Backend> {
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for ExpertService<B> {
    fn clone(&self) -> Self {
        ExpertService {
            inner: self.inner.clone(),
        }
    }
}

impl<B: Backend> ExpertService<B> {
    pub fn new(shard: Arc<ExpertShard<B>>, id: NodeIdentity, limits: Limits) -> Self {
        let served = (0..id.num_layers * id.num_experts)
            .map(|_| AtomicU64::new(0))
            .collect();
        ExpertService {
            inner: Arc::new(Inner {
                shard,
                id,
                limits,
                served,
                requests: AtomicU64::new(0),
            }),
        }
    }

    /// Pairs served since start per layer, `[layer][expert]`.
    pub fn served(&self) -> Vec<Vec<u64>> {
        let e = self.inner.id.num_experts.max(1);
        self.inner
            .served
            .chunks(e)
            .map(|c| c.iter().map(|v| v.load(Ordering::Relaxed)).collect())
            .collect()
    }

    /// Expert requests served since start.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.inner.id
    }

    /// The shard served (its expert set may change while serving).
    pub fn shard(&self) -> &Arc<ExpertShard<B>> {
        &self.inner.shard
    }
}

fn error(id: u64, code: ErrorCode, message: String) -> Frame {
    Frame::new(
        FrameKind::Error,
        ErrorReply::new(id, code, message).encode(),
    )
}

impl<B: Backend> Inner<B> {
    fn hello(&self, payload: &[u8]) -> Frame {
        match Hello::decode(payload, &self.limits) {
            Err(e) => error(0, ErrorCode::BadFrame, format!("hello: {e}")),
            Ok(h) if h.model_fingerprint != self.id.model_fingerprint => error(
                0,
                ErrorCode::ModelMismatch,
                format!(
                    "node {} serves model {:x}, {} expects {:x}",
                    self.id.name, self.id.model_fingerprint, h.client, h.model_fingerprint
                ),
            ),
            Ok(_) => {
                let ack = HelloAck {
                    node: self.id.name.clone(),
                    model_fingerprint: self.id.model_fingerprint,
                    num_layers: self.id.num_layers as u32,
                    num_experts: self.id.num_experts as u32,
                    hidden: self.id.hidden as u32,
                    held: self.shard.experts().iter().map(|e| e as u32).collect(),
                };
                Frame::new(FrameKind::HelloAck, ack.encode())
            }
        }
    }

    fn serve(&self, payload: &[u8]) -> Frame {
        let req = match ExpertRequest::decode(payload, &self.limits) {
            Ok(r) => r,
            Err(e) => return error(0, ErrorCode::BadFrame, format!("expert request: {e}")),
        };
        let id = req.id;
        let layer = req.layer as usize;
        if layer >= self.id.num_layers {
            return error(
                id,
                ErrorCode::UnknownLayer,
                format!("layer {layer} of a {}-layer model", self.id.num_layers),
            );
        }
        let (rows, cols) = (req.hidden.rows as usize, req.hidden.cols as usize);
        if cols != self.id.hidden {
            return error(
                id,
                ErrorCode::BadRequest,
                format!(
                    "rows of width {cols} for a model of width {}",
                    self.id.hidden
                ),
            );
        }
        let held = self.shard.experts();
        if let Some(e) = req
            .routes
            .experts()
            .iter()
            .find(|&&e| !held.contains(e as usize))
        {
            return error(
                id,
                ErrorCode::ExpertNotHeld,
                format!(
                    "expert {e} is not held by node {} (holds {})",
                    self.id.name, held
                ),
            );
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        for &e in req.routes.experts() {
            if let Some(c) = self.served.get(layer * self.id.num_experts + e as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        let b = self.shard.backend();
        let x = match b.upload(rows, cols, &req.hidden.to_f32()) {
            Ok(x) => x,
            Err(e) => return error(id, ErrorCode::BadRequest, e.to_string()),
        };
        let mut out = b.zeros(rows, cols);
        if let Err(e) = self.shard.run(layer, &x, &req.routes, &mut out) {
            return error(id, ErrorCode::Internal, e.to_string());
        }
        let output = WireTensor::from_f32(
            rows as u32,
            cols as u32,
            &b.download(&out),
            req.hidden.dtype,
        );
        Frame::new(
            FrameKind::ExpertResponse,
            ExpertResponse { id, output }.encode(),
        )
    }
}

impl<B: Backend> Handler for ExpertService<B> {
    fn handle(&self, request: Frame) -> BoxFuture<'static, Frame> {
        let inner = self.inner.clone();
        Box::pin(async move {
            match request.kind {
                FrameKind::Hello => inner.hello(&request.payload),
                FrameKind::Ping => match Ping::decode(&request.payload, &inner.limits) {
                    Ok(p) => Frame::new(FrameKind::Pong, Pong { nonce: p.nonce }.encode()),
                    Err(e) => error(0, ErrorCode::BadFrame, format!("ping: {e}")),
                },
                FrameKind::ExpertRequest => {
                    // The experts are CPU-bound: keep them off the I/O threads.
                    let worker = inner.clone();
                    tokio::task::spawn_blocking(move || worker.serve(&request.payload))
                        .await
                        .unwrap_or_else(|e| {
                            error(0, ErrorCode::Internal, format!("expert task failed: {e}"))
                        })
                }
                other => error(
                    0,
                    ErrorCode::BadRequest,
                    format!("a node does not accept {other:?} frames"),
                ),
            }
        })
    }
}
