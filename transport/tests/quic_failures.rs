//! QUIC deadlines and dying servers: a slow handler gives `Timeout` naming the peer and leaves
//! the connection usable; a server shut down mid-use makes calls fail promptly with a peer
//! failure, never hang; a new server at a new address is reached by redialling.

mod common;

use std::time::{Duration, Instant};

use common::{handler, loopback, request, temp_dir, within};
use myriad_transport::{
    Connection, Connector, QuicConnector, QuicLimits, QuicServer, TlsConfig, TransportError,
    generate_pki,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_gives_timeout_and_the_connection_keeps_working() {
    within(60, async {
        let dir = temp_dir("deadline");
        let pki = generate_pki(&dir, &["server", "client"], "myriad-node").expect("pki");
        let server = QuicServer::bind(
            loopback(),
            &pki.config("server").expect("server"),
            QuicLimits::default(),
            handler(),
        )
        .expect("bind");
        let addr = server.local_addr().to_string();
        let connector = QuicConnector::new(
            &pki.config("client").expect("client"),
            QuicLimits::default(),
        )
        .expect("connector");
        let conn = connector.connect(&addr).await.expect("connect");

        let deadline = Duration::from_millis(200);
        let started = Instant::now();
        let err = conn
            .call(request(b"sleep:2000"), deadline)
            .await
            .expect_err("a slow call must time out");
        let waited = started.elapsed();
        match &err {
            TransportError::Timeout { peer, after } => {
                assert_eq!(peer, &addr);
                assert_eq!(*after, deadline);
            }
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(err.is_peer_failure());
        assert!(err.to_string().contains(&addr), "{err}");
        assert!(
            waited < Duration::from_millis(1500),
            "the timeout took {waited:?}"
        );

        // The same connection serves the next calls, fast and slow-but-in-time.
        assert!(!conn.is_closed());
        assert_eq!(
            conn.call(request(b"abc"), Duration::from_secs(5))
                .await
                .expect("next call")
                .payload,
            b"cba"
        );
        assert_eq!(
            conn.call(request(b"sleep:50"), Duration::from_secs(5))
                .await
                .expect("slow call")
                .payload,
            b"05:peels"
        );
        // A cancelled request is not mistaken for a bad frame.
        assert_eq!(server.stats().bad_frames(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_mid_use_fails_calls_promptly() {
    within(60, async {
        let tls = TlsConfig::InsecureDev;
        let limits = QuicLimits {
            connect_timeout: Duration::from_secs(2),
            ..QuicLimits::default()
        };
        let server = QuicServer::bind(loopback(), &tls, limits, handler()).expect("bind");
        let addr = server.local_addr().to_string();
        let connector = std::sync::Arc::new(QuicConnector::new(&tls, limits).expect("connector"));
        let conn = connector.connect(&addr).await.expect("connect");
        assert_eq!(
            conn.call(request(b"up"), Duration::from_secs(5))
                .await
                .expect("call")
                .payload,
            b"pu"
        );

        // Calls in flight (handlers sleeping) when the server goes away.
        let mut in_flight = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let conn = conn.clone();
            in_flight.spawn(async move {
                let started = Instant::now();
                (
                    conn.call(request(b"sleep:5000"), Duration::from_secs(20))
                        .await,
                    started.elapsed(),
                )
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.shutdown();
        while let Some(done) = in_flight.join_next().await {
            let (outcome, took) = done.expect("task");
            let err = outcome.expect_err("a call to a dead server must fail");
            assert!(err.is_peer_failure(), "{err:?}");
            assert!(matches!(err, TransportError::Closed { .. }), "{err:?}");
            assert!(took < Duration::from_secs(3), "the failure took {took:?}");
        }
        assert!(conn.is_closed());
        // Later calls on the dead connection fail at once…
        let err = conn
            .call(request(b"again"), Duration::from_secs(5))
            .await
            .expect_err("dead connection");
        assert!(err.is_peer_failure(), "{err:?}");
        // …and redialling the dead address fails within the connect timeout.
        let started = Instant::now();
        let err = connector
            .connect(&addr)
            .await
            .err()
            .expect("nobody listens there");
        assert!(err.is_peer_failure(), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        drop(server);

        // A node that comes back (at a new address) is dialled afresh.
        let server = QuicServer::bind(loopback(), &tls, limits, handler()).expect("bind");
        let conn = connector
            .connect(&server.local_addr().to_string())
            .await
            .expect("connect");
        assert_eq!(
            conn.call(request(b"back"), Duration::from_secs(5))
                .await
                .expect("call")
                .payload,
            b"kcab"
        );
    })
    .await;
}

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
