//! The `Store` conformance suite: one async function per property of the contract in
//! `src/store.rs`, each run against `MemoryStore` and against `EtcdStore` on a real etcd
//! (`testing::EtcdServer`, one per test so tests run in parallel without sharing keys), plus
//! etcd-only tests of what memory cannot do: a restart mid-use, an unreachable endpoint.
//!
//! Every wait is bounded; lease tests use etcd's 1 s minimum TTL (the harness's election
//! timeout makes that the minimum).

use std::future::Future;
use std::time::{Duration, Instant};

use myriad_control::testing::EtcdServer;
use myriad_control::{EtcdStore, LeaseId, MemoryStore, Store, StoreError, Watch, WatchEvent};

/// Longest wait for anything that should happen "soon" (an event, a lease expiry).
const SOON: Duration = Duration::from_secs(5);

async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: nothing within {limit:?}"),
    }
}

async fn next_event(watch: &mut Watch, what: &str) -> WatchEvent {
    within(what, SOON, watch.events.recv())
        .await
        .unwrap_or_else(|| panic!("{what}: the watch ended"))
}

fn put_event(event: &WatchEvent) -> (&str, &[u8], i64) {
    match event {
        WatchEvent::Put(kv) => (&kv.key, &kv.value, kv.mod_revision),
        other => panic!("expected a put, got {other:?}"),
    }
}

fn delete_event(event: &WatchEvent) -> (&str, i64) {
    match event {
        WatchEvent::Delete { key, mod_revision } => (key, *mod_revision),
        other => panic!("expected a delete, got {other:?}"),
    }
}

async fn revision(store: &dyn Store) -> i64 {
    store.list("").await.expect("list").1
}

// ---- properties -------------------------------------------------------------------------

async fn put_get_list(store: &dyn Store) {
    assert_eq!(store.get("a/2").await.expect("get"), None);
    let r1 = store.put("a/2", b"x".to_vec(), None).await.expect("put");
    let r2 = store.put("a/1", b"y".to_vec(), None).await.expect("put");
    let r3 = store.put("b/1", b"z".to_vec(), None).await.expect("put");
    assert_eq!(
        (r2, r3),
        (r1 + 1, r1 + 2),
        "each write bumps the revision by one"
    );

    let kv = store.get("a/2").await.expect("get").expect("a/2 exists");
    assert_eq!(kv.key, "a/2");
    assert_eq!(kv.value, b"x");
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.lease),
        (r1, r1, None)
    );

    let r4 = store.put("a/2", b"x2".to_vec(), None).await.expect("put");
    assert_eq!(r4, r3 + 1);
    let kv = store.get("a/2").await.expect("get").expect("a/2 exists");
    assert_eq!(kv.value, b"x2");
    assert_eq!(
        (kv.create_revision, kv.mod_revision),
        (r1, r4),
        "an overwrite keeps create_revision"
    );

    let (kvs, rev) = store.list("a/").await.expect("list");
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["a/1", "a/2"], "ascending, only the prefix");
    assert_eq!(rev, r4, "list reads at the store's revision");
    assert_eq!(kvs[0].value, b"y");

    let (all, _) = store.list("").await.expect("list all");
    assert_eq!(all.len(), 3);
    let (none, rev) = store.list("c/").await.expect("list empty");
    assert!(none.is_empty());
    assert_eq!(rev, r4);
}

async fn put_if_is_compare_and_swap(store: &dyn Store) {
    assert!(
        store
            .put_if("k", b"v1".to_vec(), 0, None)
            .await
            .expect("put_if")
    );
    let m1 = store.get("k").await.expect("get").expect("k").mod_revision;
    assert!(
        !store
            .put_if("k", b"again".to_vec(), 0, None)
            .await
            .expect("put_if"),
        "0 means only if absent"
    );
    let before = revision(store).await;
    assert!(
        !store
            .put_if("k", b"stale".to_vec(), m1 + 100, None)
            .await
            .expect("put_if"),
        "wrong revision"
    );
    assert_eq!(
        revision(store).await,
        before,
        "a failed put_if writes nothing"
    );

    assert!(
        store
            .put_if("k", b"v2".to_vec(), m1, None)
            .await
            .expect("put_if")
    );
    let kv = store.get("k").await.expect("get").expect("k");
    assert_eq!(kv.value, b"v2");
    assert_eq!(kv.create_revision, m1);
    assert_eq!(kv.mod_revision, before + 1);
    assert!(
        !store
            .put_if("k", b"v3".to_vec(), m1, None)
            .await
            .expect("put_if"),
        "the old revision no longer matches"
    );
    assert_eq!(store.get("k").await.expect("get").expect("k").value, b"v2");
    assert!(
        !store
            .put_if("absent", b"v".to_vec(), m1, None)
            .await
            .expect("put_if"),
        "an absent key has revision 0"
    );
    assert_eq!(store.get("absent").await.expect("get"), None);
}

async fn delete_and_delete_prefix(store: &dyn Store) {
    for key in ["a/1", "a/2", "a/3", "ab", "b/1"] {
        store.put(key, b"v".to_vec(), None).await.expect("put");
    }
    assert!(store.delete("a/1").await.expect("delete"));
    assert!(!store.delete("a/1").await.expect("delete again"));
    assert_eq!(store.get("a/1").await.expect("get"), None);

    let before = revision(store).await;
    assert!(!store.delete("nothing").await.expect("delete absent"));
    assert_eq!(
        revision(store).await,
        before,
        "deleting nothing writes nothing"
    );

    assert_eq!(store.delete_prefix("a/").await.expect("delete_prefix"), 2);
    assert_eq!(
        revision(store).await,
        before + 1,
        "one delete_prefix is one write"
    );
    let (left, _) = store.list("").await.expect("list");
    let keys: Vec<&str> = left.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["ab", "b/1"]);
    assert_eq!(store.delete_prefix("a/").await.expect("delete_prefix"), 0);
}

async fn lease_expiry_deletes_and_notifies(store: &dyn Store) {
    let lease = store.grant(Duration::from_secs(1)).await.expect("grant");
    store.put("n/keep", b"v".to_vec(), None).await.expect("put");
    let rev = store
        .put("n/node", b"up".to_vec(), Some(lease))
        .await
        .expect("put with lease");
    let kv = store.get("n/node").await.expect("get").expect("n/node");
    assert_eq!(kv.lease, Some(lease));
    let mut watch = store.watch("n/", rev + 1).await.expect("watch");

    let started = Instant::now();
    let event = next_event(&mut watch, "delete on lease expiry").await;
    let (key, mod_revision) = delete_event(&event);
    assert_eq!(key, "n/node");
    assert!(mod_revision > rev);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "expired too early: {:?}",
        started.elapsed()
    );
    assert_eq!(store.get("n/node").await.expect("get"), None);
    assert!(store.get("n/keep").await.expect("get").is_some());
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseExpired(id)) if id == lease.0
    ));
}

async fn keep_alive_extends_a_lease(store: &dyn Store) {
    let lease = store.grant(Duration::from_secs(1)).await.expect("grant");
    store
        .put("ka/node", b"up".to_vec(), Some(lease))
        .await
        .expect("put with lease");
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        store.keep_alive(lease).await.expect("keep_alive");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        store.get("ka/node").await.expect("get").is_some(),
        "kept alive past 2.5 TTLs"
    );
    // Without refreshes the lease does run out: it was a real 1 s lease.
    within("expiry after the last refresh", SOON, async {
        while store.get("ka/node").await.expect("get").is_some() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

async fn leases_are_distinct(store: &dyn Store) {
    let a = store.grant(Duration::from_secs(5)).await.expect("grant");
    let b = store.grant(Duration::from_secs(5)).await.expect("grant");
    assert_ne!(a, b);
    assert_ne!(a, LeaseId(0), "0 is etcd's no-lease");
    assert_ne!(b, LeaseId(0), "0 is etcd's no-lease");
}

async fn revoke_deletes_now(store: &dyn Store) {
    let lease = store.grant(Duration::from_secs(30)).await.expect("grant");
    store
        .put("r/1", b"v".to_vec(), Some(lease))
        .await
        .expect("put");
    store
        .put("r/2", b"v".to_vec(), Some(lease))
        .await
        .expect("put");
    store.put("r/3", b"v".to_vec(), None).await.expect("put");
    let before = revision(store).await;
    store.revoke(lease).await.expect("revoke");
    let (left, rev) = store.list("r/").await.expect("list");
    let keys: Vec<&str> = left.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["r/3"]);
    assert_eq!(rev, before + 1, "a lease's keys go in one write");

    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseExpired(id)) if id == lease.0
    ));
    assert!(matches!(
        store.revoke(lease).await,
        Err(StoreError::LeaseExpired(_))
    ));
    assert!(matches!(
        store.put("r/4", b"v".to_vec(), Some(lease)).await,
        Err(StoreError::LeaseExpired(_))
    ));
    assert!(matches!(
        store.put_if("r/4", b"v".to_vec(), 0, Some(lease)).await,
        Err(StoreError::LeaseExpired(_))
    ));
    assert_eq!(store.get("r/4").await.expect("get"), None);
}

async fn watch_sees_changes_in_order(store: &dyn Store) {
    let mut watch = store.watch("w/", 0).await.expect("watch");
    let r1 = store.put("w/a", b"1".to_vec(), None).await.expect("put");
    let r2 = store.put("w/b", b"2".to_vec(), None).await.expect("put");
    store
        .put("x/c", b"other".to_vec(), None)
        .await
        .expect("put");
    let r4 = store.put("w/a", b"3".to_vec(), None).await.expect("put");
    assert!(store.delete("w/b").await.expect("delete"));
    assert_eq!(store.delete_prefix("w/").await.expect("delete_prefix"), 1);

    let e = next_event(&mut watch, "put w/a").await;
    assert_eq!(put_event(&e), ("w/a", &b"1"[..], r1));
    let e = next_event(&mut watch, "put w/b").await;
    assert_eq!(put_event(&e), ("w/b", &b"2"[..], r2));
    let e = next_event(&mut watch, "put w/a again").await;
    assert_eq!(put_event(&e), ("w/a", &b"3"[..], r4));
    if let WatchEvent::Put(kv) = &e {
        assert_eq!(kv.create_revision, r1);
    }
    let e = next_event(&mut watch, "delete w/b").await;
    assert_eq!(delete_event(&e), ("w/b", r4 + 1));
    let e = next_event(&mut watch, "delete_prefix w/").await;
    assert_eq!(delete_event(&e), ("w/a", r4 + 2));
}

async fn watch_from_a_past_revision_replays(store: &dyn Store) {
    store.put("p/a", b"1".to_vec(), None).await.expect("put");
    let r2 = store.put("p/b", b"2".to_vec(), None).await.expect("put");
    store
        .put("q/x", b"other".to_vec(), None)
        .await
        .expect("put");
    assert!(store.delete("p/a").await.expect("delete"));
    let r5 = store.put("p/c", b"3".to_vec(), None).await.expect("put");

    let mut replay = store.watch("p/", r2).await.expect("watch from r2");
    let e = next_event(&mut replay, "replayed put p/b").await;
    assert_eq!(put_event(&e), ("p/b", &b"2"[..], r2));
    let e = next_event(&mut replay, "replayed delete p/a").await;
    assert_eq!(delete_event(&e), ("p/a", r2 + 2));
    let e = next_event(&mut replay, "replayed put p/c").await;
    assert_eq!(put_event(&e), ("p/c", &b"3"[..], r5));

    // list, then watch from its revision + 1: nothing before, everything after.
    let (_, rev) = store.list("p/").await.expect("list");
    let mut after_list = store.watch("p/", rev + 1).await.expect("watch after list");
    let mut from_now = store.watch("p/", 0).await.expect("watch from now");
    let r6 = store.put("p/d", b"4".to_vec(), None).await.expect("put");
    for (watch, what) in [
        (&mut replay, "replay goes on live"),
        (&mut after_list, "watch from list + 1"),
        (&mut from_now, "watch from now"),
    ] {
        let e = next_event(watch, what).await;
        assert_eq!(put_event(&e), ("p/d", &b"4"[..], r6), "{what}");
    }
}

// ---- the two stores ---------------------------------------------------------------------

macro_rules! conformance {
    ($($property:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $property() {
                    let store = myriad_control::MemoryStore::new();
                    super::$property(&store).await;
                }
            )*
        }

        mod etcd {
            $(
                #[tokio::test]
                async fn $property() {
                    let (_server, store) = super::etcd().await;
                    super::$property(&store).await;
                }
            )*
        }
    };
}

conformance!(
    put_get_list,
    put_if_is_compare_and_swap,
    delete_and_delete_prefix,
    lease_expiry_deletes_and_notifies,
    keep_alive_extends_a_lease,
    leases_are_distinct,
    revoke_deletes_now,
    watch_sees_changes_in_order,
    watch_from_a_past_revision_replays,
);

async fn etcd() -> (EtcdServer, EtcdStore) {
    let server = EtcdServer::start().await.expect("start etcd");
    let store = EtcdStore::connect(&[server.endpoint()])
        .await
        .expect("connect to etcd");
    (server, store)
}

// ---- beyond the shared properties -------------------------------------------------------

fn assert_compacted(result: Result<Watch, StoreError>) {
    match result {
        Err(e) => assert!(e.to_string().contains("compacted"), "{e}"),
        Ok(_) => panic!("a watch from a compacted revision must fail"),
    }
}

#[tokio::test]
async fn memory_watch_before_history_is_compacted() {
    let store = MemoryStore::with_history(2);
    let first = store.put("h/a", b"1".to_vec(), None).await.expect("put");
    for _ in 0..4 {
        store.put("h/a", b"2".to_vec(), None).await.expect("put");
    }
    assert_compacted(store.watch("h/", first).await);
    let (_, rev) = store.list("h/").await.expect("list");
    let mut watch = store
        .watch("h/", rev)
        .await
        .expect("the newest revision is kept");
    let e = next_event(&mut watch, "the newest put").await;
    assert_eq!(put_event(&e).2, rev);
}

#[tokio::test]
async fn etcd_watch_before_compaction_is_compacted() {
    let (_server, store) = etcd().await;
    let first = store.put("h/a", b"1".to_vec(), None).await.expect("put");
    let last = store.put("h/a", b"2".to_vec(), None).await.expect("put");
    store.compact(last).await.expect("compact");
    assert_compacted(store.watch("h/", first).await);
}

#[tokio::test]
async fn etcd_restart_ends_watches_and_the_store_recovers() {
    let (mut server, store) = etcd().await;
    let before = store
        .put("s/a", b"persisted".to_vec(), None)
        .await
        .expect("put");
    let mut watch = store.watch("s/", 0).await.expect("watch");
    store.put("s/b", b"live".to_vec(), None).await.expect("put");
    let e = next_event(&mut watch, "the watch is live").await;
    assert_eq!(put_event(&e).0, "s/b");

    server.restart().await.expect("restart etcd");
    let ended = within("the old watch ends", SOON, watch.events.recv()).await;
    assert_eq!(ended, None, "a broken watch must end, not stall");

    // The connection broke under the client; it must reconnect by itself.
    let mut failures = Vec::new();
    let kv = within("the store answers after the restart", SOON, async {
        loop {
            match store.get("s/a").await {
                Ok(kv) => break kv,
                Err(e) => {
                    failures.push(e.to_string());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await;
    assert!(
        failures.len() <= 1,
        "the client should reconnect at once: {failures:?}"
    );
    let kv = kv.expect("s/a survived the restart");
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (&b"persisted"[..], before)
    );

    let (_, rev) = store.list("s/").await.expect("list after restart");
    let mut watch = store.watch("s/", rev + 1).await.expect("re-watch");
    let r = store
        .put("s/c", b"after".to_vec(), None)
        .await
        .expect("put");
    assert!(r > before);
    let e = next_event(&mut watch, "the new watch is live").await;
    assert_eq!(put_event(&e), ("s/c", &b"after"[..], r));
    let lease = store.grant(Duration::from_secs(5)).await.expect("grant");
    store.keep_alive(lease).await.expect("keep_alive");
}

#[tokio::test]
async fn etcd_down_fails_fast_naming_the_endpoint() {
    let (mut server, _) = etcd().await;
    let store = EtcdStore::connect_with_timeouts(
        &[server.endpoint()],
        Duration::from_secs(2),
        Duration::from_secs(1),
    )
    .await
    .expect("connect");
    server.stop();
    let started = Instant::now();
    let err = store
        .get("x")
        .await
        .expect_err("etcd is down, the get must fail");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            err,
            StoreError::Unavailable { .. } | StoreError::Timeout { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&server.endpoint()), "{err}");

    let started = Instant::now();
    let err = EtcdStore::connect_with_timeouts(
        &[server.endpoint()],
        Duration::from_secs(1),
        Duration::from_secs(1),
    )
    .await
    .expect_err("nobody listens");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains(&server.endpoint()), "{err}");

    // Failed calls while etcd was down must not leave the store broken once it is back.
    server.restart().await.expect("start etcd again");
    let mut failures = Vec::new();
    within("the store answers once etcd is back", SOON, async {
        while let Err(e) = store.put("x", b"back".to_vec(), None).await {
            failures.push(e.to_string());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(failures.len() <= 1, "{failures:?}");
    assert!(store.get("x").await.expect("get").is_some());
}
