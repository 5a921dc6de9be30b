//! [`MemoryStore`]: the [`Store`] contract in one process's memory, for the embedded
//! single-process default and for unit tests. It keeps etcd's semantics where the contract
//! leaves room (checked against etcd by `tests/conformance.rs`):
//! - the store starts at revision 1; a write that changes nothing (deleting an absent key, a
//!   failed `put_if`, revoking a lease without keys) does not bump it;
//! - one `delete_prefix`, and one lease's expiry or revocation, is one revision: all its delete
//!   events carry the same `mod_revision`;
//! - leases expire on their own: a background sweeper (a tokio task started on the first
//!   `grant`) deletes the keys of expired leases and tells watchers even when nobody calls the
//!   store; every operation also expires due leases first, so reads never see a dead lease's
//!   keys between sweeps;
//! - a bounded history of recent events lets `watch` start at a past revision; older than the
//!   history, `watch` fails as etcd does for a compacted revision.
//!
//! A watcher that falls more than [`WATCH_BUFFER`] events behind is ended (its receiver
//! closes) rather than buffered without bound; per the contract, the caller lists again and
//! watches from the new revision.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::store::{BoxFuture, KeyValue, LeaseId, Store, StoreError, Watch, WatchEvent};

/// Events kept for `watch` from a past revision, by default.
pub const DEFAULT_HISTORY: usize = 4096;
/// Live events a watcher may have unread before it is ended.
pub const WATCH_BUFFER: usize = 4096;
/// The sweeper re-checks at least this often, so it notices a dropped store and a lease whose
/// deadline it has not been told about.
const SWEEP_IDLE: Duration = Duration::from_secs(1);

/// The contract in memory. Cheap to clone: clones share one store.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes the sweeper when a lease is granted, whose deadline may be the next one. Kept
    /// outside `Inner`'s lifetime so the sweeper can wait on it holding only a `Weak<Inner>`.
    wake: Arc<Notify>,
    sweeper: Mutex<Option<JoinHandle<()>>>,
}

struct Entry {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    lease: Option<LeaseId>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    /// First revision this watcher wants (a `from` in the future is allowed).
    from: i64,
    tx: mpsc::Sender<WatchEvent>,
}

struct State {
    revision: i64,
    keys: BTreeMap<String, Entry>,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    history: VecDeque<WatchEvent>,
    history_limit: usize,
    /// The newest revision whose events are (at least partly) gone from `history`.
    compacted: i64,
    watchers: Vec<Watcher>,
}

fn event_revision(event: &WatchEvent) -> i64 {
    match event {
        WatchEvent::Put(kv) => kv.mod_revision,
        WatchEvent::Delete { mod_revision, .. } => *mod_revision,
    }
}

impl State {
    fn new(history_limit: usize) -> State {
        State {
            // etcd's first revision: an empty store reads at 1, its first write is 2.
            revision: 1,
            keys: BTreeMap::new(),
            leases: HashMap::new(),
            next_lease: 1,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 0,
            watchers: Vec::new(),
        }
    }

    fn key_value(key: &str, entry: &Entry) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: entry.value.clone(),
            create_revision: entry.create_revision,
            mod_revision: entry.mod_revision,
            lease: entry.lease,
        }
    }

    fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a Entry)> {
        self.keys
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// Records the events of one write (all at `self.revision`) and hands them to watchers.
    fn commit(&mut self, events: Vec<WatchEvent>) {
        for event in &events {
            self.history.push_back(event.clone());
        }
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = self.compacted.max(event_revision(&old));
            }
        }
        self.watchers.retain(|w| {
            for event in &events {
                if event_revision(event) < w.from || !event.key().starts_with(&w.prefix) {
                    continue;
                }
                // Full: the reader is too far behind (see the module doc); closed: it is gone.
                if w.tx.try_send(event.clone()).is_err() {
                    return false;
                }
            }
            true
        });
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<(), StoreError> {
        match lease {
            Some(id) if !self.leases.contains_key(&id.0) => Err(StoreError::LeaseExpired(id.0)),
            _ => Ok(()),
        }
    }

    fn put(&mut self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> i64 {
        self.revision += 1;
        let revision = self.revision;
        let create_revision = match self.keys.get(key) {
            Some(old) => {
                if old.lease != lease
                    && let Some(old_lease) = old.lease
                    && let Some(l) = self.leases.get_mut(&old_lease.0)
                {
                    l.keys.remove(key);
                }
                old.create_revision
            }
            None => revision,
        };
        if let Some(id) = lease
            && let Some(l) = self.leases.get_mut(&id.0)
        {
            l.keys.insert(key.to_string());
        }
        let entry = Entry {
            value,
            create_revision,
            mod_revision: revision,
            lease,
        };
        let kv = State::key_value(key, &entry);
        self.keys.insert(key.to_string(), entry);
        self.commit(vec![WatchEvent::Put(kv)]);
        revision
    }

    /// Deletes `keys` (those that exist) as one write; returns how many existed.
    fn delete_keys(&mut self, keys: Vec<String>) -> usize {
        let present: Vec<String> = keys
            .into_iter()
            .filter(|k| self.keys.contains_key(k))
            .collect();
        if present.is_empty() {
            return 0;
        }
        self.revision += 1;
        let revision = self.revision;
        let mut events = Vec::with_capacity(present.len());
        for key in present {
            if let Some(entry) = self.keys.remove(&key)
                && let Some(id) = entry.lease
                && let Some(l) = self.leases.get_mut(&id.0)
            {
                l.keys.remove(&key);
            }
            events.push(WatchEvent::Delete {
                key,
                mod_revision: revision,
            });
        }
        let n = events.len();
        self.commit(events);
        n
    }

    /// Ends `id` and deletes its keys; false if there was no such lease.
    fn end_lease(&mut self, id: i64) -> bool {
        match self.leases.remove(&id) {
            Some(lease) => {
                self.delete_keys(lease.keys.into_iter().collect());
                true
            }
            None => false,
        }
    }

    /// Ends every lease whose deadline has passed, oldest deadline first.
    fn expire(&mut self, now: Instant) {
        let mut due: Vec<(Instant, i64)> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, l)| (l.deadline, *id))
            .collect();
        due.sort();
        for (_, id) in due {
            self.end_lease(id);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.deadline).min()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store keeping [`DEFAULT_HISTORY`] events for watches from past revisions.
    pub fn new() -> MemoryStore {
        MemoryStore::with_history(DEFAULT_HISTORY)
    }

    /// An empty store keeping the last `events` events (at least 1) for watches from past
    /// revisions.
    pub fn with_history(events: usize) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new(events)),
                wake: Arc::new(Notify::new()),
                sweeper: Mutex::new(None),
            }),
        }
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// Locks the state after expiring due leases, so no operation sees a dead lease's keys.
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way later
        // operations trip over, so a poisoned lock is still usable.
        let mut state = self
            .inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.expire(Instant::now());
        state
    }

    /// Starts the sweeper on the current runtime if it is not running (first grant, or the
    /// runtime it ran on has shut down).
    fn ensure_sweeper(&self) {
        let mut sweeper = self
            .inner
            .sweeper
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if sweeper.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Outside a runtime only the lazy expiry on each operation applies.
            return;
        };
        let inner = Arc::downgrade(&self.inner);
        let wake = Arc::clone(&self.inner.wake);
        *sweeper = Some(runtime.spawn(sweep(inner, wake)));
    }
}

async fn sweep(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let mut state = inner
                .state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let now = Instant::now();
            state.expire(now);
            state.next_deadline()
        };
        let idle = Instant::now() + SWEEP_IDLE;
        let until = next.map_or(idle, |d| d.min(idle));
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = wake.notified() => {}
        }
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

/// Whole seconds, rounded up, at least one (the contract's lease granularity).
fn whole_seconds(ttl: Duration) -> Duration {
    let mut secs = ttl.as_secs();
    if ttl.subsec_nanos() > 0 {
        secs += 1;
    }
    Duration::from_secs(secs.max(1))
}

impl Store for MemoryStore {
    fn describe(&self) -> String {
        "memory".to_string()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>> {
        Box::pin(async move {
            let state = self.lock();
            Ok(state.keys.get(key).map(|e| State::key_value(key, e)))
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<(Vec<KeyValue>, i64), StoreError>> {
        Box::pin(async move {
            let state = self.lock();
            let kvs = state
                .under(prefix)
                .map(|(k, e)| State::key_value(k, e))
                .collect();
            Ok((kvs, state.revision))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<i64, StoreError>> {
        Box::pin(async move {
            let mut state = self.lock();
            state.check_lease(lease)?;
            Ok(state.put(key, value, lease))
        })
    }

    fn put_if<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expected: i64,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut state = self.lock();
            let current = state.keys.get(key).map_or(0, |e| e.mod_revision);
            if current != expected {
                return Ok(false);
            }
            // As in etcd, the lease is only checked for the branch that runs.
            state.check_lease(lease)?;
            state.put(key, value, lease);
            Ok(true)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut state = self.lock();
            Ok(state.delete_keys(vec![key.to_string()]) == 1)
        })
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<usize, StoreError>> {
        Box::pin(async move {
            let mut state = self.lock();
            let keys = state.under(prefix).map(|(k, _)| k.clone()).collect();
            Ok(state.delete_keys(keys))
        })
    }

    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>> {
        Box::pin(async move {
            let ttl = whole_seconds(ttl);
            let id = {
                let mut state = self.lock();
                let id = state.next_lease;
                state.next_lease += 1;
                state.leases.insert(
                    id,
                    Lease {
                        ttl,
                        deadline: Instant::now() + ttl,
                        keys: BTreeSet::new(),
                    },
                );
                id
            };
            self.ensure_sweeper();
            self.inner.wake.notify_one();
            Ok(LeaseId(id))
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut state = self.lock();
            match state.leases.get_mut(&lease.0) {
                Some(l) => {
                    l.deadline = Instant::now() + l.ttl;
                    Ok(())
                }
                None => Err(StoreError::LeaseExpired(lease.0)),
            }
        })
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut state = self.lock();
            if state.end_lease(lease.0) {
                Ok(())
            } else {
                Err(StoreError::LeaseExpired(lease.0))
            }
        })
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: i64) -> BoxFuture<'a, Result<Watch, StoreError>> {
        Box::pin(async move {
            let mut state = self.lock();
            let from = if from <= 0 { state.revision + 1 } else { from };
            if from <= state.compacted {
                return Err(StoreError::Other(format!(
                    "watch {prefix:?} from revision {from}: compacted (memory store keeps \
                     events from revision {} on); list again and watch from its revision + 1",
                    state.compacted + 1
                )));
            }
            let replay: Vec<WatchEvent> = state
                .history
                .iter()
                .filter(|e| event_revision(e) >= from && e.key().starts_with(prefix))
                .cloned()
                .collect();
            let (tx, rx) = mpsc::channel(replay.len() + WATCH_BUFFER);
            for event in replay {
                // Cannot fail: the channel was sized for the replay and nobody reads yet.
                let _ = tx.try_send(event);
            }
            state.watchers.push(Watcher {
                prefix: prefix.to_string(),
                from,
                tx,
            });
            Ok(Watch { events: rx })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_seconds_rounds_up_to_at_least_one() {
        assert_eq!(whole_seconds(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(
            whole_seconds(Duration::from_millis(1500)),
            Duration::from_secs(2)
        );
        assert_eq!(
            whole_seconds(Duration::from_secs(3)),
            Duration::from_secs(3)
        );
    }

    #[tokio::test]
    async fn lagging_watcher_is_ended_not_buffered_forever() {
        let store = MemoryStore::with_history(1);
        let mut watch = store.watch("k", 0).await.expect("watch");
        for _ in 0..=WATCH_BUFFER {
            store.put("k", vec![], None).await.expect("put");
        }
        let mut seen = 0;
        while watch.events.recv().await.is_some() {
            seen += 1;
        }
        assert_eq!(
            seen, WATCH_BUFFER,
            "the watcher got a full buffer, then its stream ended"
        );
    }

    #[tokio::test]
    async fn dropping_the_store_ends_watches() {
        let store = MemoryStore::new();
        let mut watch = store.watch("", 0).await.expect("watch");
        drop(store);
        assert!(watch.events.recv().await.is_none());
    }
}
