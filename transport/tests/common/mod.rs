//! Helpers shared by the transport tests: temp dirs, handlers, a raw quinn client, and a
//! guard that keeps any test from hanging.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use myriad_transport::{BoxFuture, Frame, Handler, TlsConfig};
use myriad_wire::FrameKind;
use quinn::crypto::rustls::QuicClientConfig;

/// Runs `test` but fails it after `secs` seconds instead of hanging.
pub async fn within<T>(secs: u64, test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), test)
        .await
        .expect("the test took too long (hung?)")
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "myriad-transport-{tag}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Replies with the payload reversed; a payload `sleep:<ms>` sleeps that long first, and a
/// payload `grow:<n>` gets a reply of `n` bytes, and the payload `panic` panics.
pub struct Reverse;

impl Handler for Reverse {
    fn handle(&self, request: Frame) -> BoxFuture<'static, Frame> {
        Box::pin(async move {
            assert!(
                request.payload != b"panic",
                "the test handler was asked to panic"
            );
            if let Some(ms) = number_after(b"sleep:", &request.payload) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if let Some(n) = number_after(b"grow:", &request.payload) {
                return Frame::new(FrameKind::ExpertResponse, vec![7; n as usize]);
            }
            let mut payload = request.payload;
            payload.reverse();
            Frame::new(FrameKind::ExpertResponse, payload)
        })
    }
}

fn number_after(prefix: &[u8], payload: &[u8]) -> Option<u64> {
    let rest = payload.strip_prefix(prefix)?;
    std::str::from_utf8(rest).ok()?.parse().ok()
}

pub fn request(payload: &[u8]) -> Frame {
    Frame::new(FrameKind::ExpertRequest, payload.to_vec())
}

pub fn reversed(payload: &[u8]) -> Vec<u8> {
    payload.iter().rev().copied().collect()
}

pub fn handler() -> Arc<dyn Handler> {
    Arc::new(Reverse)
}

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A raw quinn connection with the client side of `tls`, for writing arbitrary bytes.
pub async fn raw_connect(tls: &TlsConfig, server: SocketAddr) -> quinn::Connection {
    let crypto = QuicClientConfig::try_from(tls.client_config().expect("client TLS config"))
        .expect("QUIC TLS config");
    let endpoint = quinn::Endpoint::client(loopback()).expect("client endpoint");
    endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            server,
            tls.server_name(),
        )
        .expect("connect")
        .await
        .expect("handshake")
}
