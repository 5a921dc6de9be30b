//! The attention node's side of the control plane: it follows the current placement version by
//! watch and hands each new one to its router (which switches between steps), reports the
//! version its steps run in its leased node record, and publishes how many tokens it routed to
//! each expert over a sliding window, for the rebalancer.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use myriad_wire::Placement;
use tokio::sync::watch;

use crate::keys::Keys;
use crate::membership::Registration;
use crate::records::{
    AttentionNodeRecord, LoadReport, PlacementDoc, decode, decode_version, encode,
};
use crate::store::{Store, StoreError, WatchEvent};

/// What the follower needs from the attention node's router.
pub trait PlacementSink: Send + Sync + 'static {
    /// Publishes a placement version (active from the next step boundary).
    fn set_placement(&self, version: u64, placement: Placement) -> Result<(), String>;
    /// The version the node's steps use.
    fn applied(&self) -> watch::Receiver<u64>;
    /// Tokens routed to each expert since start, summed over layers.
    fn expert_tokens(&self) -> Vec<u64>;
    /// Expert nodes whose last call failed for want of an answer (none succeeded since).
    fn unreachable(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Follower settings.
#[derive(Clone, Debug)]
pub struct FollowerConfig {
    /// The sliding window of load reports.
    pub window: Duration,
    /// How often a load report is written.
    pub report_every: Duration,
    pub metrics_addr: Option<String>,
}

impl Default for FollowerConfig {
    fn default() -> Self {
        FollowerConfig {
            window: Duration::from_secs(30),
            report_every: Duration::from_secs(1),
            metrics_addr: None,
        }
    }
}

/// The current placement version, read once; `None` if none is published yet.
pub async fn current_placement(
    store: &dyn Store,
    keys: &Keys,
) -> Result<Option<PlacementDoc>, StoreError> {
    let Some(kv) = store.get(&keys.current()).await? else {
        return Ok(None);
    };
    let version = decode_version(&kv)?;
    let doc = store
        .get(&keys.version(version))
        .await?
        .ok_or_else(|| StoreError::Corrupt {
            key: keys.current(),
            reason: format!("names version {version}, which is not stored"),
        })?;
    Ok(Some(decode(&doc)?))
}

/// Waits (polling, bounded by `timeout`) until a placement is published.
pub async fn wait_for_placement(
    store: &dyn Store,
    keys: &Keys,
    timeout: Duration,
) -> Result<PlacementDoc, StoreError> {
    let deadline = Instant::now() + timeout;
    loop {
        match current_placement(store, keys).await {
            Ok(Some(doc)) => return Ok(doc),
            Ok(None) | Err(StoreError::Unavailable { .. }) if Instant::now() < deadline => {}
            Ok(None) => {
                return Err(StoreError::Timeout {
                    op: format!("waiting for a placement under {}", keys.root()),
                    after: timeout,
                });
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the follower until `shutdown` turns true.
pub async fn follow(
    store: Arc<dyn Store>,
    keys: Keys,
    registration: Arc<Registration>,
    name: String,
    sink: Arc<dyn PlacementSink>,
    config: FollowerConfig,
    shutdown: watch::Receiver<bool>,
) {
    let watcher = tokio::spawn(watch_placement(
        store.clone(),
        keys.clone(),
        sink.clone(),
        shutdown.clone(),
    ));
    let reporter = tokio::spawn(report(keys, registration, name, sink, config, shutdown));
    let _ = watcher.await;
    let _ = reporter.await;
}

async fn watch_placement(
    store: Arc<dyn Store>,
    keys: Keys,
    sink: Arc<dyn PlacementSink>,
    mut shutdown: watch::Receiver<bool>,
) {
    let apply = |doc: PlacementDoc| match doc.to_placement() {
        Ok(p) => {
            let _ = sink.set_placement(doc.version, p);
        }
        Err(_) => {
            // A placement the controller wrote is always valid; a hand-edited bad one is
            // ignored and the current one kept.
        }
    };
    while !*shutdown.borrow() {
        // (Re)start: read the current version, then watch from just after that read.
        let rev = match store.list(&keys.current()).await {
            Ok((_, rev)) => rev,
            Err(_) => {
                pause(&mut shutdown, Duration::from_millis(200)).await;
                continue;
            }
        };
        if let Ok(Some(doc)) = current_placement(&*store, &keys).await {
            apply(doc);
        }
        let Ok(mut w) = store.watch(&keys.current(), rev + 1).await else {
            pause(&mut shutdown, Duration::from_millis(200)).await;
            continue;
        };
        loop {
            tokio::select! {
                ev = w.events.recv() => match ev {
                    Some(WatchEvent::Put(_)) => {
                        if let Ok(Some(doc)) = current_placement(&*store, &keys).await {
                            apply(doc);
                        }
                    }
                    Some(WatchEvent::Delete { .. }) => {}
                    None => break,
                },
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }
}

async fn report(
    keys: Keys,
    registration: Arc<Registration>,
    name: String,
    sink: Arc<dyn PlacementSink>,
    config: FollowerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut applied = sink.applied();
    let record = |version: u64| AttentionNodeRecord {
        name: name.clone(),
        placement_version: version,
        metrics_addr: config.metrics_addr.clone(),
    };
    let initial = *applied.borrow_and_update();
    // A record write that failed (the store was unreachable) is retried on every report tick:
    // the controller drops old copies only once the record shows the new version.
    let mut unreported = registration
        .put(&keys.attention_node(&name), encode(&record(initial)))
        .await
        .is_err();
    // Cumulative counts at past report times; the window is the difference to the oldest.
    let mut history: VecDeque<(Instant, Vec<u64>)> = VecDeque::new();
    // Expert nodes this node reports it cannot reach (a leased key each: if this node dies,
    // its suspicions go with it).
    let mut suspected: BTreeSet<String> = BTreeSet::new();
    let mut ticker = tokio::time::interval(config.report_every);
    loop {
        tokio::select! {
            r = applied.changed() => {
                if r.is_err() {
                    return;
                }
                let v = *applied.borrow_and_update();
                unreported = registration
                    .put(&keys.attention_node(&name), encode(&record(v)))
                    .await
                    .is_err();
            }
            _ = ticker.tick() => {
                if unreported {
                    let v = *applied.borrow();
                    unreported = registration
                        .put(&keys.attention_node(&name), encode(&record(v)))
                        .await
                        .is_err();
                }
                let now = Instant::now();
                let tokens = sink.expert_tokens();
                history.push_back((now, tokens.clone()));
                while history.len() > 1
                    && history.front().is_some_and(|(t, _)| now.duration_since(*t) > config.window)
                {
                    history.pop_front();
                }
                if let Some((t0, old)) = history.front() {
                    let window: Vec<u64> =
                        tokens.iter().zip(old).map(|(a, b)| a.saturating_sub(*b)).collect();
                    let r = LoadReport {
                        node: name.clone(),
                        window_secs: now.duration_since(*t0).as_secs_f64(),
                        tokens: window,
                    };
                    let _ = registration.put(&keys.load(&name), encode(&r)).await;
                }
                let down: BTreeSet<String> = sink.unreachable().into_iter().collect();
                for node in &down {
                    let _ = registration.put(&keys.suspect(node, &name), Vec::new()).await;
                }
                for node in suspected.difference(&down) {
                    let _ = registration.remove(&keys.suspect(node, &name)).await;
                }
                suspected = down;
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

async fn pause(shutdown: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.changed() => {}
    }
}
