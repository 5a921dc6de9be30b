//! What only the in-process transport does: its registry of handlers by address. Unregistering
//! is a node dying, registering again is a restart (reached by new connections only), and
//! clones of a `LocalNetwork` share one registry. What every transport does is in
//! `conformance.rs`.

mod common;

use std::time::Duration;

use common::{handler, request, within};
use myriad_transport::{Connector, LocalNetwork, TransportError};

const DEADLINE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn unregister_says_whether_a_node_was_registered() {
    let network = LocalNetwork::new();
    assert!(!network.is_registered("expert-0"));
    network.register("expert-0", handler());
    assert!(network.is_registered("expert-0"));
    assert!(network.unregister("expert-0"));
    assert!(!network.unregister("expert-0"));
    assert!(!network.is_registered("expert-0"));
}

#[tokio::test]
async fn a_restarted_node_is_reached_by_new_connections_only() {
    within(30, async {
        let network = LocalNetwork::new();
        let connector = network.connector();
        network.register("expert-0", handler());
        let conn = connector.connect("expert-0").await.expect("connect");
        assert!(network.unregister("expert-0"));

        network.register("expert-0", handler());
        assert!(conn.is_closed());
        let err = conn.call(request(b"x"), DEADLINE).await.expect_err("dead");
        assert!(matches!(err, TransportError::Closed { .. }), "{err:?}");
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
        let err = fresh.call(request(b"x"), DEADLINE).await.expect_err("dead");
        assert!(matches!(err, TransportError::Closed { .. }), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn clones_of_a_network_share_its_registry() {
    within(30, async {
        let network = LocalNetwork::new();
        let clone = network.clone();
        clone.register("expert-1", handler());
        assert!(network.is_registered("expert-1"));
        let other = network
            .connector()
            .connect("expert-1")
            .await
            .expect("connect");
        assert_eq!(
            other
                .call(request(b"ab"), DEADLINE)
                .await
                .expect("call")
                .payload,
            b"ba"
        );
        assert!(clone.unregister("expert-1"));
        assert!(other.is_closed());
        assert!(!network.is_registered("expert-1"));
    })
    .await;
}
