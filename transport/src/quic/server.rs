//! The serving side of the QUIC transport: [`QuicServer`] runs an accept loop with one task per
//! connection and one per stream. A stream carries one request frame; its reply is the
//! [`Handler`]'s frame. A bad frame is answered with an error frame (when the stream allows)
//! and closes that peer's whole connection with [`CLOSE_BAD_FRAME`]; other connections are
//! unaffected. Tasks are owned in `JoinSet`s, so shutting the server down (or dropping it)
//! aborts every connection and every handler still running.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, Incoming, RecvStream, SendStream, VarInt};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

use super::stream::{ReadFailure, read_frame, write_frame};
use super::{CLOSE_BAD_FRAME, CLOSE_SHUTDOWN, QuicLimits};
use crate::error_reply::error_frame;
use crate::tls::TlsConfig;
use crate::{Frame, Handler, TransportError};

/// How long a rejected peer's error frame may take to be acknowledged before its connection is
/// closed anyway (closing discards unsent stream data).
const REJECT_LINGER: Duration = Duration::from_secs(2);

/// Counters of what a server has seen (monotonic).
#[derive(Debug, Default)]
pub struct ServerStats {
    connections: AtomicU64,
    failed_handshakes: AtomicU64,
    requests: AtomicU64,
    bad_frames: AtomicU64,
}

impl ServerStats {
    /// Connections that completed the handshake.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
    /// Connection attempts refused during the handshake (bad or missing certificate, ALPN).
    pub fn failed_handshakes(&self) -> u64 {
        self.failed_handshakes.load(Ordering::Relaxed)
    }
    /// Well-formed requests handed to the handler.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Bad frames, each of which closed its connection.
    pub fn bad_frames(&self) -> u64 {
        self.bad_frames.load(Ordering::Relaxed)
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A node's QUIC server. Shut down by [`QuicServer::shutdown`] or on drop.
pub struct QuicServer {
    endpoint: Endpoint,
    local_addr: SocketAddr,
    stats: Arc<ServerStats>,
    accept: JoinHandle<()>,
}

/// What every task of one server shares.
struct Shared {
    handler: Arc<dyn Handler>,
    limits: QuicLimits,
    stats: Arc<ServerStats>,
}

impl QuicServer {
    /// Listens on `addr` (port 0: any free port, see [`QuicServer::local_addr`]) and serves
    /// every well-formed request with `handler`. Must be called within a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        tls: &TlsConfig,
        limits: QuicLimits,
        handler: Arc<dyn Handler>,
    ) -> Result<QuicServer, TransportError> {
        let crypto = QuicServerConfig::try_from(tls.server_config()?).map_err(|e| {
            TransportError::Tls(format!("QUIC needs a TLS 1.3 AES-128-GCM suite: {e}"))
        })?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(limits.transport(true)?);
        let endpoint =
            super::endpoint(addr, Some(config)).map_err(|source| TransportError::Io {
                what: format!("server UDP socket on {addr}"),
                source,
            })?;
        let local_addr = endpoint.local_addr().map_err(|source| TransportError::Io {
            what: format!("server UDP socket on {addr}"),
            source,
        })?;
        let stats = Arc::new(ServerStats::default());
        let shared = Arc::new(Shared {
            handler,
            limits,
            stats: stats.clone(),
        });
        let accept = tokio::spawn(accept_loop(endpoint.clone(), shared));
        Ok(QuicServer {
            endpoint,
            local_addr,
            stats,
            accept,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Closes every connection (peers see [`super::CLOSE_SHUTDOWN`]), stops accepting and
    /// aborts the handlers still running. Idempotent.
    pub fn shutdown(&self) {
        self.endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"server shutting down");
        self.accept.abort();
    }

    /// Waits until the close has been delivered to every peer (or they timed out).
    pub async fn wait_closed(&self) {
        self.endpoint.wait_idle().await;
    }
}

impl Drop for QuicServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept_loop(endpoint: Endpoint, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    connections.spawn(serve_connection(incoming, shared.clone()));
                }
                None => break,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(incoming: Incoming, shared: Arc<Shared>) {
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(_) => {
            ServerStats::bump(&shared.stats.failed_handshakes);
            return;
        }
    };
    ServerStats::bump(&shared.stats.connections);
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(conn.clone(), send, recv, shared.clone()));
                }
                Err(_) => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

async fn serve_stream(
    conn: quinn::Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    shared: Arc<Shared>,
) {
    let limits = &shared.limits;
    let request = match read_frame(
        &mut recv,
        limits.max_frame,
        Some(limits.header_timeout),
        Some(limits.header_timeout),
    )
    .await
    {
        Ok(request) => request,
        // Reset by the client (it gave up) or the connection is gone: nobody to answer.
        Err(ReadFailure::Stream(_)) => return,
        Err(bad) => {
            drop(recv);
            reject(&conn, send, &bad.to_string(), &shared.stats).await;
            return;
        }
    };
    ServerStats::bump(&shared.stats.requests);
    let mut reply = run_handler(&shared.handler, request).await;
    if reply.payload.len() > limits.max_frame as usize {
        reply = error_frame(&format!(
            "the node's reply of {} bytes exceeds the frame limit of {}",
            reply.payload.len(),
            limits.max_frame
        ));
    }
    // A client that gave up has stopped the stream; there is nothing to do about a failed write.
    let _ = write_frame(&mut send, reply).await;
}

/// Runs the handler on its own task, so that a panic becomes an error reply; the task is
/// aborted if this one is (shutdown).
async fn run_handler(handler: &Arc<dyn Handler>, request: Frame) -> Frame {
    struct AbortOnDrop(JoinHandle<Frame>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(tokio::spawn(handler.handle(request)));
    match (&mut task.0).await {
        Ok(reply) => reply,
        Err(e) => error_frame(&format!("the node failed to handle the request: {e}")),
    }
}

/// Answers a bad frame with an error frame, waits (briefly) for the peer to acknowledge it, and
/// closes the peer's connection.
async fn reject(
    conn: &quinn::Connection,
    mut send: SendStream,
    message: &str,
    stats: &ServerStats,
) {
    ServerStats::bump(&stats.bad_frames);
    let _ = timeout(REJECT_LINGER, async {
        if write_frame(&mut send, error_frame(message)).await.is_ok() {
            let _ = send.stopped().await;
        }
    })
    .await;
    let reason: String = message.chars().take(200).collect();
    conn.close(VarInt::from_u32(CLOSE_BAD_FRAME), reason.as_bytes());
}
