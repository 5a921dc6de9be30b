//! The calling side of the QUIC transport: [`QuicConnector`] owns one client endpoint (one UDP
//! socket) and at most one live connection per address, dialled on first use and redialled
//! once it is closed; [`QuicConnection::call`] runs one call on a fresh bidirectional stream,
//! all of it (opening the stream, writing the request, reading the reply) under the deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use myriad_wire::WireError;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ConnectionError, Endpoint, ReadError, SendStream, VarInt, WriteError};
use tokio::time::timeout;

use super::stream::{ReadFailure, read_frame, write_frame};
use super::{CLOSE_SHUTDOWN, QuicLimits, STREAM_CANCELLED};
use crate::tls::TlsConfig;
use crate::{BoxFuture, Connection, Connector, Frame, TransportError};

/// The connection to one address, shared by concurrent dials of that address.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<QuicConnection>>>>;

/// Dials nodes over QUIC and keeps one connection per address.
pub struct QuicConnector {
    endpoint: Endpoint,
    client_config: quinn::ClientConfig,
    server_name: String,
    limits: QuicLimits,
    slots: Mutex<HashMap<String, Slot>>,
}

impl QuicConnector {
    /// A client endpoint on an ephemeral IPv4 port (`0.0.0.0:0`). Must be called within a
    /// tokio runtime.
    pub fn new(tls: &TlsConfig, limits: QuicLimits) -> Result<QuicConnector, TransportError> {
        QuicConnector::bind(tls, limits, SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// A client endpoint on `local` (e.g. `[::]:0` to reach IPv6 nodes).
    pub fn bind(
        tls: &TlsConfig,
        limits: QuicLimits,
        local: SocketAddr,
    ) -> Result<QuicConnector, TransportError> {
        let crypto = QuicClientConfig::try_from(tls.client_config()?).map_err(|e| {
            TransportError::Tls(format!("QUIC needs a TLS 1.3 AES-128-GCM suite: {e}"))
        })?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
        client_config.transport_config(limits.transport(false)?);
        let endpoint = super::endpoint(local, None).map_err(|source| TransportError::Io {
            what: format!("client UDP socket on {local}"),
            source,
        })?;
        Ok(QuicConnector {
            endpoint,
            client_config,
            server_name: tls.server_name().to_owned(),
            limits,
            slots: Mutex::default(),
        })
    }

    /// The local UDP address of the endpoint.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|source| TransportError::Io {
                what: "client UDP socket".into(),
                source,
            })
    }

    /// The live connection to `addr` (`host:port`), dialling it if there is none.
    pub async fn dial(&self, addr: &str) -> Result<Arc<QuicConnection>, TransportError> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(addr.to_owned())
            .or_default()
            .clone();
        let mut current = slot.lock().await;
        if let Some(conn) = current.as_ref()
            && !conn.is_closed()
        {
            return Ok(conn.clone());
        }
        let after = self.limits.connect_timeout;
        let conn = timeout(after, self.establish(addr))
            .await
            .unwrap_or_else(|_| {
                Err(connect_error(
                    addr,
                    format!("no handshake within {after:?}"),
                ))
            })?;
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// Closes every connection of this endpoint (calls in flight fail with `Closed`).
    pub fn close(&self) {
        self.endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"client closed");
    }

    async fn establish(&self, addr: &str) -> Result<Arc<QuicConnection>, TransportError> {
        let target = self.resolve(addr).await?;
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), target, &self.server_name)
            .map_err(|e| connect_error(addr, e.to_string()))?;
        let conn = connecting
            .await
            .map_err(|e| connect_error(addr, e.to_string()))?;
        Ok(Arc::new(QuicConnection {
            peer: addr.to_owned(),
            conn,
            max_frame: self.limits.max_frame,
        }))
    }

    /// `addr` as a socket address of the endpoint's family.
    async fn resolve(&self, addr: &str) -> Result<SocketAddr, TransportError> {
        let want_v4 = self.local_addr()?.is_ipv4();
        let candidates: Vec<SocketAddr> = match addr.parse::<SocketAddr>() {
            Ok(a) => vec![a],
            Err(_) => tokio::net::lookup_host(addr)
                .await
                .map_err(|e| connect_error(addr, format!("cannot resolve: {e}")))?
                .collect(),
        };
        // An IPv6 socket reaches IPv4 addresses too (mapped); an IPv4 one only IPv4.
        candidates
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == want_v4)
            .or_else(|| candidates.iter().copied().find(|_| !want_v4))
            .ok_or_else(|| {
                connect_error(
                    addr,
                    format!("no address of the client endpoint's family among {candidates:?}"),
                )
            })
    }
}

impl Connector for QuicConnector {
    fn connect(&self, addr: &str) -> BoxFuture<'_, Result<Arc<dyn Connection>, TransportError>> {
        let addr = addr.to_owned();
        Box::pin(async move { self.dial(&addr).await.map(|c| c as Arc<dyn Connection>) })
    }
}

fn connect_error(peer: &str, reason: String) -> TransportError {
    TransportError::Connect {
        peer: peer.to_owned(),
        reason,
    }
}

/// A QUIC connection to one node.
pub struct QuicConnection {
    peer: String,
    conn: quinn::Connection,
    max_frame: u32,
}

/// Resets a request stream whose call did not finish (deadline, error), so the server sees a
/// cancelled stream rather than a truncated frame.
struct CancelOnDrop {
    send: SendStream,
    done: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.send.reset(VarInt::from_u32(STREAM_CANCELLED));
        }
    }
}

impl QuicConnection {
    /// The QUIC connection underneath (statistics, RTT).
    pub fn quinn(&self) -> &quinn::Connection {
        &self.conn
    }

    async fn exchange(&self, request: Frame) -> Result<Frame, TransportError> {
        let (send, mut recv) = self.conn.open_bi().await.map_err(|e| self.lost(e))?;
        let mut send = CancelOnDrop { send, done: false };
        write_frame(&mut send.send, request)
            .await
            .map_err(|e| self.write_failed(e))?;
        let reply = read_frame(&mut recv, self.max_frame, None, None)
            .await
            .map_err(|e| self.read_failed(e))?;
        send.done = true;
        Ok(reply)
    }

    fn lost(&self, e: ConnectionError) -> TransportError {
        TransportError::Closed {
            peer: self.peer.clone(),
            reason: e.to_string(),
        }
    }

    fn write_failed(&self, e: WriteError) -> TransportError {
        match e {
            WriteError::ConnectionLost(e) => self.lost(e),
            e => TransportError::Closed {
                peer: self.peer.clone(),
                reason: format!("sending the request: {e}"),
            },
        }
    }

    fn read_failed(&self, e: ReadFailure) -> TransportError {
        // A truncated reply on a connection that is now closed is the close, not a bad frame.
        if let ReadFailure::Truncated { .. } = e
            && let Some(reason) = self.conn.close_reason()
        {
            return self.lost(reason);
        }
        let peer = self.peer.clone();
        match e {
            ReadFailure::Header(source) => TransportError::Wire { peer, source },
            ReadFailure::Stream(ReadError::ConnectionLost(e)) => self.lost(e),
            e @ (ReadFailure::Truncated { .. } | ReadFailure::Trailing) => TransportError::Wire {
                peer,
                source: WireError::Malformed {
                    what: "reply frame",
                    detail: e.to_string(),
                },
            },
            e @ (ReadFailure::Stream(_) | ReadFailure::Stalled { .. }) => TransportError::Closed {
                peer,
                reason: format!("reading the reply: {e}"),
            },
        }
    }
}

impl Connection for QuicConnection {
    fn call(
        &self,
        request: Frame,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<Frame, TransportError>> {
        Box::pin(async move {
            if request.payload.len() > self.max_frame as usize {
                return Err(TransportError::FrameTooLarge {
                    peer: self.peer.clone(),
                    len: request.payload.len(),
                    max: self.max_frame,
                });
            }
            timeout(deadline, self.exchange(request))
                .await
                .unwrap_or_else(|_| {
                    Err(TransportError::Timeout {
                        peer: self.peer.clone(),
                        after: deadline,
                    })
                })
        })
    }

    fn peer(&self) -> &str {
        &self.peer
    }

    fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }
}
