//! What only QUIC does when connections fail: a closed connection is redialled, dialling gives
//! up within the connect timeout (and on names that do not resolve), idle connections live on
//! keep-alives, and a panicking handler becomes an error reply (the server runs handlers on
//! tasks of their own). Deadlines and nodes going away, which every transport must handle, are
//! in `conformance.rs`.

mod common;

use std::time::{Duration, Instant};

use common::{handler, loopback, request, within};
use myriad_transport::{
    Connection, Connector, QuicConnector, QuicLimits, QuicServer, TlsConfig, TransportError,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_is_redialled() {
    within(60, async {
        let tls = TlsConfig::InsecureDev;
        let server =
            QuicServer::bind(loopback(), &tls, QuicLimits::default(), handler()).expect("bind");
        let addr = server.local_addr().to_string();
        let connector = QuicConnector::new(&tls, QuicLimits::default()).expect("connector");
        let first = connector.dial(&addr).await.expect("dial");
        first.quinn().close(0u32.into(), b"test closes it");
        assert!(first.is_closed());
        let second = connector.dial(&addr).await.expect("redial");
        assert!(!std::sync::Arc::ptr_eq(&first, &second));
        let reply = second
            .call(request(b"xy"), Duration::from_secs(5))
            .await
            .expect("call");
        assert_eq!(reply.payload, b"yx");
        assert_eq!(server.stats().connections(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_address_fails_within_the_connect_timeout() {
    within(30, async {
        let limits = QuicLimits {
            connect_timeout: Duration::from_millis(500),
            ..QuicLimits::default()
        };
        let connector = QuicConnector::new(&TlsConfig::InsecureDev, limits).expect("connector");
        // A UDP port nobody serves QUIC on.
        let socket = std::net::UdpSocket::bind(loopback()).expect("udp");
        let addr = socket.local_addr().expect("addr").to_string();
        let started = Instant::now();
        let err = connector.connect(&addr).await.err().expect("no server");
        assert!(matches!(err, TransportError::Connect { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let err = connector
            .connect("no-such-host.invalid:4433")
            .await
            .err()
            .expect("no such host");
        assert!(matches!(err, TransportError::Connect { .. }), "{err:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_survive_on_keep_alives() {
    within(60, async {
        let tls = TlsConfig::InsecureDev;
        let limits = QuicLimits {
            idle_timeout: Duration::from_millis(600),
            ..QuicLimits::default()
        };
        let server = QuicServer::bind(loopback(), &tls, limits, handler()).expect("bind");
        let connector = QuicConnector::new(&tls, limits).expect("connector");
        let conn = connector
            .dial(&server.local_addr().to_string())
            .await
            .expect("dial");
        assert_eq!(
            conn.call(request(b"1"), Duration::from_secs(5))
                .await
                .expect("call")
                .payload,
            b"1"
        );
        // Three idle timeouts without a call (keep-alives every 200 ms).
        tokio::time::sleep(Duration::from_millis(1800)).await;
        assert!(!conn.is_closed());
        assert_eq!(
            conn.call(request(b"12"), Duration::from_secs(5))
                .await
                .expect("call")
                .payload,
            b"21"
        );
        assert_eq!(server.stats().connections(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_gives_an_error_reply() {
    within(60, async {
        let tls = TlsConfig::InsecureDev;
        let server =
            QuicServer::bind(loopback(), &tls, QuicLimits::default(), handler()).expect("bind");
        let connector = QuicConnector::new(&tls, QuicLimits::default()).expect("connector");
        let conn = connector
            .dial(&server.local_addr().to_string())
            .await
            .expect("dial");
        let reply = conn
            .call(request(b"panic"), Duration::from_secs(5))
            .await
            .expect("an error reply");
        let message = myriad_transport::error_message(&reply).expect("an error frame");
        assert!(message.contains("failed to handle"), "{message}");
        // The connection and the server carry on.
        assert_eq!(
            conn.call(request(b"ok"), Duration::from_secs(5))
                .await
                .expect("call")
                .payload,
            b"ko"
        );
        assert_eq!(server.stats().bad_frames(), 0);
    })
    .await;
}
