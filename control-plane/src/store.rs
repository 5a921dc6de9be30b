//! The store contract the control plane is written against: a small subset of etcd's model
//! (keys with revisions, leases, compare-and-swap, prefix watches) that both [`crate::etcd`]
//! and [`crate::memory`] implement with the same semantics, checked by one conformance suite
//! (`tests/conformance.rs`).
//!
//! Semantics every implementation keeps:
//! - Every successful write bumps the store's revision by one; a key's `mod_revision` is the
//!   revision of its last write, `create_revision` of its creation. An absent key has revision 0.
//! - A key written with a lease is deleted when the lease expires or is revoked (a delete event
//!   is sent to watchers).
//! - `list` returns keys in ascending byte order, with the store revision it read at; `watch`
//!   from `list`'s revision + 1 sees every change after that read, in revision order.
//! - A watch whose stream ends (the store went away) is to be re-established by the caller:
//!   list again, then watch from the new revision.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A lease: keys attached to it live as long as it is kept alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: Option<LeaseId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, mod_revision: i64 },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

/// A prefix watch: events in revision order until the stream ends.
#[derive(Debug)]
pub struct Watch {
    pub events: mpsc::Receiver<WatchEvent>,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("control-plane store at {endpoint} is unavailable: {reason}")]
    Unavailable { endpoint: String, reason: String },
    #[error("lease {0:x} has expired or was revoked")]
    LeaseExpired(i64),
    #[error("control-plane store: {op} timed out after {after:?}")]
    Timeout { op: String, after: Duration },
    #[error("control-plane key {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("control-plane store: {0}")]
    Other(String),
}

/// The control plane's view of etcd.
pub trait Store: Send + Sync + 'static {
    /// Where the store lives, for messages (`etcd http://127.0.0.1:2379`, `memory`).
    fn describe(&self) -> String;

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>>;

    /// Every key under `prefix`, ascending, and the store revision the read was made at.
    fn list<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<(Vec<KeyValue>, i64), StoreError>>;

    /// Writes `key` (attached to `lease` if given); returns the new revision.
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<i64, StoreError>>;

    /// Writes `key` only if its current `mod_revision` is `expected` (0: only if absent).
    /// Returns whether it wrote.
    fn put_if<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expected: i64,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Deletes `key`; returns whether it existed.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Deletes every key under `prefix`; returns how many.
    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<usize, StoreError>>;

    /// A new lease of `ttl` (whole seconds, at least 1).
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>>;

    /// Refreshes `lease` once; `LeaseExpired` if it is gone.
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Ends `lease` now, deleting its keys.
    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Changes under `prefix` from revision `from` (inclusive; 0: from now).
    fn watch<'a>(&'a self, prefix: &'a str, from: i64) -> BoxFuture<'a, Result<Watch, StoreError>>;
}
