//! The QUIC transport (quinn, TLS 1.3 through rustls with the ring provider).
//!
//! One bidirectional stream per call: the client writes one frame (header + payload) and
//! finishes its side, the server answers with one frame and finishes its side. Connections are
//! long-lived (a client dials each node once and redials when the connection is closed; keep-
//! alives hold it open between decode steps) and carry many concurrent calls.
//!
//! - [`client`]: [`QuicConnector`] and [`QuicConnection`];
//! - [`server`]: [`QuicServer`], its accept loop and per-stream serving;
//! - [`stream`]: reading and writing one frame on a stream, with limits checked before
//!   allocating;
//! - this file: [`QuicLimits`], the QUIC transport parameters they imply, and the close codes.
//!
//! A peer that sends a bad frame (wrong magic, unsupported version, unknown kind, a length over
//! [`QuicLimits::max_frame`], a truncated or stalled frame, bytes after the frame) gets an
//! error frame on that stream where the stream allows it, and then its whole connection is
//! closed with [`CLOSE_BAD_FRAME`]; the server keeps serving every other connection.
//!
//! Both sides should use the same limits: a client refuses to send a frame over its own
//! `max_frame` ([`crate::TransportError::FrameTooLarge`]) rather than let the server drop the
//! connection.

pub mod client;
pub mod server;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};

use crate::TransportError;

pub use client::{QuicConnection, QuicConnector};

/// Socket buffer size requested for QUIC endpoints. The Linux default (208 KiB) drops packets
/// when a layer step's megabyte of activations arrives at once; the kernel caps the request at
/// `net.core.{r,w}mem_max`.
const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket on `addr` with large buffers, for a quinn endpoint.
pub(crate) fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer only costs retransmissions.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A quinn endpoint on `addr` (a server if `server` is given).
pub(crate) fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| {
        std::io::Error::other("no async runtime found (start the endpoint inside a tokio runtime)")
    })?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        udp_socket(addr)?,
        runtime,
    )
}
pub use server::{QuicServer, ServerStats};

/// The default payload limit: 256 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 256 << 20;

/// Application close code: the server is shutting down (or a client endpoint closed).
pub const CLOSE_SHUTDOWN: u32 = 0;
/// Application close code: the peer sent a bad frame and was disconnected.
pub const CLOSE_BAD_FRAME: u32 = 1;

/// Stream error code: a client gave up on a call (deadline) and reset its request stream, so
/// the server does not take the partial frame for a bad one.
pub const STREAM_CANCELLED: u32 = 1;

/// Sizes and timeouts of the QUIC transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuicLimits {
    /// Largest frame payload accepted (and sent), in bytes.
    pub max_frame: u32,
    /// A connection with no traffic for this long is dead. Keep-alives are sent every third of
    /// it, so an idle but healthy connection survives; a vanished peer is noticed after it.
    pub idle_timeout: Duration,
    /// A server gives a new stream this long to deliver its frame header, and a frame's payload
    /// this long between two pieces; a peer that stalls longer is disconnected.
    pub header_timeout: Duration,
    /// Concurrent calls a client may have open on one connection to a server (more wait).
    pub max_concurrent_streams: u32,
    /// How long dialling a node (resolution and handshake) may take.
    pub connect_timeout: Duration,
}

impl Default for QuicLimits {
    fn default() -> Self {
        QuicLimits {
            max_frame: DEFAULT_MAX_FRAME,
            idle_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            max_concurrent_streams: 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Per-stream and per-connection flow-control windows. Large enough that an 8 MiB layer step
/// over a fast link is not window-bound; they bound buffering, not allocation up front.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;

impl QuicLimits {
    fn check(&self) -> Result<(), TransportError> {
        let bad = |what: &str| Err(TransportError::Config(format!("{what} in {self:?}")));
        if self.idle_timeout.is_zero() {
            return bad("idle_timeout must be positive");
        }
        if self.header_timeout.is_zero() {
            return bad("header_timeout must be positive");
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout must be positive");
        }
        if self.max_concurrent_streams == 0 {
            return bad("max_concurrent_streams must be at least 1");
        }
        Ok(())
    }

    /// The QUIC transport parameters of a server (which accepts `max_concurrent_streams`
    /// bidirectional streams) or a client (which accepts none: servers never open streams).
    pub(crate) fn transport_config(&self, server: bool) -> Result<TransportConfig, TransportError> {
        self.check()?;
        let idle = IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            TransportError::Config(format!("idle_timeout {:?} is too long", self.idle_timeout))
        })?;
        let mut config = TransportConfig::default();
        config
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.idle_timeout / 3))
            .max_concurrent_bidi_streams(VarInt::from_u32(if server {
                self.max_concurrent_streams
            } else {
                0
            }))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
            .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
            .send_window(u64::from(CONNECTION_WINDOW));
        Ok(config)
    }

    pub(crate) fn transport(&self, server: bool) -> Result<Arc<TransportConfig>, TransportError> {
        self.transport_config(server).map(Arc::new)
    }
}
