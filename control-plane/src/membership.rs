//! Membership: a node's keys live under one lease that a background task keeps alive. When the
//! lease is lost (etcd restarted and the lease lapsed meanwhile, or the process stalled past its
//! TTL) the task takes a new lease and writes the node's keys again, so a node that is still
//! running comes back by itself; a node that stops is gone once its TTL passes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::store::{LeaseId, Store, StoreError};

struct Shared {
    lease: LeaseId,
    /// Every key written under the lease, with its latest value (rewritten after a new lease)
    /// and whether it is exclusive (rewritten only if nobody else took it meanwhile).
    keys: BTreeMap<String, (Vec<u8>, bool)>,
    /// Times the lease was lost and taken again.
    renewals: u64,
}

/// A node's presence in the store.
pub struct Registration {
    store: Arc<dyn Store>,
    ttl: Duration,
    shared: Arc<Mutex<Shared>>,
    keeper: JoinHandle<()>,
}

impl Registration {
    /// Takes a lease of `ttl` and starts keeping it alive (must run inside a tokio runtime).
    pub async fn new(store: Arc<dyn Store>, ttl: Duration) -> Result<Registration, StoreError> {
        let lease = store.grant(ttl).await?;
        let shared = Arc::new(Mutex::new(Shared {
            lease,
            keys: BTreeMap::new(),
            renewals: 0,
        }));
        let keeper = tokio::spawn(keep(store.clone(), ttl, shared.clone()));
        Ok(Registration {
            store,
            ttl,
            shared,
            keeper,
        })
    }

    pub fn lease(&self) -> LeaseId {
        self.lock().lease
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How many times the lease was lost and taken again.
    pub fn renewals(&self) -> u64 {
        self.lock().renewals
    }

    /// Writes `key` under the lease (and remembers it for re-registration).
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let lease = {
            let mut s = self.lock();
            s.keys.insert(key.to_string(), (value.clone(), false));
            s.lease
        };
        self.store.put(key, value, Some(lease)).await.map(|_| ())
    }

    /// Writes `key` under the lease only if absent (leader election); remembered on success.
    pub async fn create(&self, key: &str, value: Vec<u8>) -> Result<bool, StoreError> {
        let lease = self.lease();
        let created = self
            .store
            .put_if(key, value.clone(), 0, Some(lease))
            .await?;
        if created {
            self.lock().keys.insert(key.to_string(), (value, true));
        }
        Ok(created)
    }

    /// Whether `key` is currently written under this registration's lease.
    pub async fn owns(&self, key: &str) -> Result<bool, StoreError> {
        let lease = self.lease();
        Ok(self
            .store
            .get(key)
            .await?
            .is_some_and(|kv| kv.lease == Some(lease)))
    }

    /// Deletes `key` and stops rewriting it.
    pub async fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.forget(key);
        self.store.delete(key).await.map(|_| ())
    }

    /// Forgets `key` (it is no longer rewritten) without deleting it.
    pub fn forget(&self, key: &str) {
        self.lock().keys.remove(key);
    }

    /// Leaves: revokes the lease, deleting every key under it.
    pub async fn leave(self) -> Result<(), StoreError> {
        self.keeper.abort();
        let lease = self.lease();
        self.store.revoke(lease).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

async fn keep(store: Arc<dyn Store>, ttl: Duration, shared: Arc<Mutex<Shared>>) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        let lease = shared.lock().unwrap_or_else(|e| e.into_inner()).lease;
        match store.keep_alive(lease).await {
            Ok(()) => {}
            Err(StoreError::LeaseExpired(_)) => {
                // Still alive, lease gone: come back under a new one.
                let Ok(new) = store.grant(ttl).await else {
                    continue;
                };
                let keys = {
                    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                    s.lease = new;
                    s.renewals += 1;
                    s.keys.clone()
                };
                for (k, (v, exclusive)) in keys {
                    if exclusive {
                        if !matches!(store.put_if(&k, v, 0, Some(new)).await, Ok(true)) {
                            shared
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .keys
                                .remove(&k);
                        }
                    } else {
                        rewrite(&*store, &shared, &k, v, new).await;
                    }
                }
            }
            // The store is unreachable: keep trying; the lease may still be valid when it returns.
            Err(_) => {}
        }
    }
}

/// Writes `key` under `lease` again; if a [`Registration::put`] changed it meanwhile (its write
/// may have landed before this one), writes the newest value, so a stale one is never left.
async fn rewrite(
    store: &dyn Store,
    shared: &Mutex<Shared>,
    key: &str,
    mut value: Vec<u8>,
    lease: LeaseId,
) {
    loop {
        let _ = store.put(key, value.clone(), Some(lease)).await;
        let latest = shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .get(key)
            .map(|(v, _)| v.clone());
        match latest {
            Some(v) if v != value => value = v,
            _ => return,
        }
    }
}
