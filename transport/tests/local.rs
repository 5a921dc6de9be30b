//! The in-process transport: register/call/unregister, restarts, deadlines and size limits
//! behave like the network transports.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{handler, request, within};
use myriad_transport::{Connector, LocalNetwork, TransportError};

const DEADLINE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn register_call_unregister() {
    within(30, async {
        let network = LocalNetwork::new();
        let connector = network.connector();
        match connector.connect("expert-0").await {
            Err(e @ TransportError::Connect { .. }) => {
                assert!(e.is_peer_failure() && e.to_string().contains("expert-0"))
            }
            Err(other) => panic!("expected Connect, got {other:?}"),
            Ok(_) => panic!("dialled an unregistered node"),
        }

        network.register("expert-0", handler());
        network.register("expert-1", handler());
        assert!(network.is_registered("expert-0"));
        let conn = connector.connect("expert-0").await.expect("connect");
        assert_eq!(conn.peer(), "expert-0");
        assert!(!conn.is_closed());
        assert_eq!(
            conn.call(request(b"hello"), DEADLINE)
                .await
                .expect("call")
                .payload,
            b"olleh"
        );

        // A call in flight when the node dies fails with Closed, promptly.
        let pending = {
            let conn = conn.clone();
            tokio::spawn(async move {
                conn.call(request(b"sleep:10000"), Duration::from_secs(20))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        assert!(network.unregister("expert-0"));
        assert!(!network.unregister("expert-0"));
        let err = pending.await.expect("task").expect_err("the node died");
        assert!(
            matches!(err, TransportError::Closed { .. }) && err.is_peer_failure(),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));

        // Later calls fail with Closed, new dials with Connect; other nodes are unaffected.
        assert!(conn.is_closed());
        let err = conn.call(request(b"x"), DEADLINE).await.expect_err("dead");
        assert!(matches!(err, TransportError::Closed { .. }), "{err:?}");
        assert!(matches!(
            connector.connect("expert-0").await,
            Err(TransportError::Connect { .. })
        ));
        let other = connector.connect("expert-1").await.expect("connect");
        assert_eq!(
            other
                .call(request(b"ab"), DEADLINE)
                .await
                .expect("call")
                .payload,
            b"ba"
        );

        // A restarted node is reached by new connections only.
        network.register("expert-0", handler());
        assert!(conn.is_closed());
        let fresh = connector.connect("expert-0").await.expect("connect");
        assert_eq!(
            fresh
                .call(request(b"up"), DEADLINE)
                .await
                .expect("call")
                .payload,
            b"pu"
        );
        // Registering over a live node kills the old registration's connections.
        network.register("expert-0", handler());
        assert!(fresh.is_closed());

        // Clones share the registry.
        let clone = network.clone();
        clone.unregister("expert-1");
        assert!(other.is_closed());
    })
    .await;
}

#[tokio::test]
async fn deadlines_and_limits() {
    within(30, async {
        let network = LocalNetwork::with_max_frame(1000);
        network.register("node", handler());
        let conn = network.connector().connect("node").await.expect("connect");

        let started = Instant::now();
        match conn
            .call(request(b"sleep:5000"), Duration::from_millis(100))
            .await
        {
            Err(e @ TransportError::Timeout { .. }) => {
                assert!(e.is_peer_failure());
                assert!(e.to_string().contains("node"), "{e}");
            }
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        // The connection still works.
        assert_eq!(
            conn.call(request(b"sleep:10"), DEADLINE)
                .await
                .expect("call")
                .payload,
            b"01:peels"
        );

        match conn.call(request(&[0; 1001]), DEADLINE).await {
            Err(e @ TransportError::FrameTooLarge { .. }) => assert!(!e.is_peer_failure()),
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        match conn.call(request(b"grow:1001"), DEADLINE).await {
            Err(e @ TransportError::Wire { .. }) => assert!(e.is_peer_failure()),
            other => panic!("expected Wire, got {other:?}"),
        }
        assert_eq!(
            conn.call(request(&[3; 1000]), DEADLINE)
                .await
                .expect("call")
                .payload
                .len(),
            1000
        );

        // Many concurrent calls.
        let conn: Arc<dyn myriad_transport::Connection> = conn;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let conn = conn.clone();
            tasks.spawn(async move {
                let payload = i.to_le_bytes();
                let reply = conn.call(request(&payload), DEADLINE).await.expect("call");
                assert_eq!(
                    reply.payload,
                    payload.iter().rev().copied().collect::<Vec<_>>()
                );
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("task");
        }
    })
    .await;
}
