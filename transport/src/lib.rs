//! Moving frames between Myriad nodes.
//!
//! One request/response contract ([`Connector`] / [`Connection`] on the calling side, [`Handler`]
//! on the serving side) with interchangeable implementations: in-process (the embedded default
//! and tests), QUIC with mutual TLS (the CPU and cross-host path), and NCCL (GPU clusters,
//! behind the `nccl` feature). Frames are [`myriad_wire`] frames; a transport checks the
//! frame header (magic, version, kind, size limit) before reading a payload, answers a peer that
//! sends anything else with an error frame and drops that connection, and keeps serving every
//! other peer.
//!
//! | module | owns |
//! | --- | --- |
//! | [`local`] | the in-process transport ([`LocalNetwork`]) |
//! | [`tls`] | certificates: [`TlsConfig`] (mutual TLS from files, or insecure dev certs), [`generate_pki`] |
//! | [`quic`] | QUIC over quinn: [`QuicConnector`] (client) and [`QuicServer`] |
//! | [`error_reply`] | the payload of [`FrameKind::Error`] replies the transport itself sends |
//! | `nccl` | NCCL point-to-point through cudarc (feature `nccl`) |
//!
//! Every call has a deadline; a call that fails says whether the peer is to blame
//! ([`TransportError::is_peer_failure`]), so the router can fail over to a replica.

pub mod error_reply;
pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod quic;
pub mod tls;

pub use error_reply::{error_frame, error_message};
pub use local::{LocalConnection, LocalConnector, LocalNetwork};
#[cfg(feature = "nccl")]
pub use nccl::{NcclConnection, NcclConnector, NcclTransport, nccl_unique_id};
pub use quic::{QuicConnection, QuicConnector, QuicLimits, QuicServer, ServerStats};
pub use tls::{GeneratedPki, TlsConfig, generate_pki};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use myriad_wire::{FrameKind, WireError};
use thiserror::Error;

/// A boxed, sendable future (the traits below are used as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One frame: its kind and payload (the header is the transport's business).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: FrameKind, payload: Vec<u8>) -> Self {
        Frame { kind, payload }
    }
}

/// Why a call did not produce a reply.
#[derive(Debug, Error)]
pub enum TransportError {
    #[error("cannot reach {peer}: {reason}")]
    Connect { peer: String, reason: String },
    #[error("{peer} did not answer within {after:?}")]
    Timeout { peer: String, after: Duration },
    #[error("connection to {peer} lost: {reason}")]
    Closed { peer: String, reason: String },
    #[error("{peer} sent a bad frame: {source}")]
    Wire { peer: String, source: WireError },
    #[error("TLS setup: {0}")]
    Tls(String),
    /// Settings a transport cannot work with (zero timeouts, …).
    #[error("transport configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("I/O on {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// The caller tried to send a frame larger than the transport's limit; nothing was sent
    /// (the peer would have dropped the connection).
    #[error("a frame of {len} bytes for {peer} exceeds the limit of {max}")]
    FrameTooLarge { peer: String, len: usize, max: u32 },
}

impl TransportError {
    /// Whether the peer may work again later (so callers should fail over, not give up).
    pub fn is_peer_failure(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. }
                | TransportError::Timeout { .. }
                | TransportError::Closed { .. }
                | TransportError::Wire { .. }
        )
    }
}

/// The calling side of a connection to one node.
pub trait Connection: Send + Sync {
    /// Sends `request` and waits for the node's reply, for at most `deadline`.
    fn call(
        &self,
        request: Frame,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<Frame, TransportError>>;
    /// The peer's address as dialled.
    fn peer(&self) -> &str;
    /// Whether the connection is known to be dead (a new one must be dialled).
    fn is_closed(&self) -> bool;
}

/// Dials nodes.
pub trait Connector: Send + Sync {
    fn connect(&self, addr: &str) -> BoxFuture<'_, Result<Arc<dyn Connection>, TransportError>>;
}

/// What a node does with each well-formed request frame. Replies are frames too (an
/// [`FrameKind::Error`] frame for a request it cannot serve).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Frame) -> BoxFuture<'static, Frame>;
}
