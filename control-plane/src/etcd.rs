//! [`EtcdStore`]: the [`Store`] contract on etcd (v3 gRPC API, through our own small client in
//! [`client`] with the messages of [`rpc`]), plus the mapping of etcd's errors to
//! [`StoreError`]s that name the endpoint.
//!
//! Every operation runs under a deadline ([`DEFAULT_OP_TIMEOUT`]), because the client's own
//! request timeout does not cover waiting for a connection. A watch is forwarded by a task
//! that ends (closing the receiver) when etcd's stream breaks, is cancelled or errs, so the
//! caller re-lists and re-watches as the contract says.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::{Code, Status};

use crate::store::{BoxFuture, KeyValue, LeaseId, Store, StoreError, Watch, WatchEvent};

pub mod client;
pub mod rpc;

use client::Client;
use rpc::prefix_range;

/// How long [`EtcdStore::connect`] waits for etcd to answer.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one operation (or establishing a watch) may take.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Events a watch may have unread before the forwarding task waits for the reader (etcd
/// itself then buffers, so nothing is lost).
const WATCH_CHANNEL: usize = 1024;

/// The contract on an etcd cluster. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// The endpoints as given, joined with `,`, for messages.
    endpoint: String,
    op_timeout: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoint", &self.endpoint)
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`http://host:port`) and checks that it answers a read,
    /// with the default timeouts.
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        EtcdStore::connect_with_timeouts(endpoints, DEFAULT_CONNECT_TIMEOUT, DEFAULT_OP_TIMEOUT)
            .await
    }

    /// [`EtcdStore::connect`] with explicit timeouts: `connect` bounds the whole connect (TCP
    /// and the first read), `op` every later operation.
    pub async fn connect_with_timeouts(
        endpoints: &[String],
        connect: Duration,
        op: Duration,
    ) -> Result<EtcdStore, StoreError> {
        let endpoint = endpoints.join(",");
        let client = Client::new(endpoints, connect).map_err(StoreError::Other)?;
        let attempt = async move {
            // The channel connects lazily; a read proves etcd is there and serving.
            client.range(get_request(b"/")).await?;
            Ok::<_, Status>(client)
        };
        let client = match tokio::time::timeout(connect, attempt).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(StoreError::Unavailable {
                    endpoint,
                    reason: format!("connecting: {e}"),
                });
            }
            Err(_) => {
                return Err(StoreError::Unavailable {
                    endpoint,
                    reason: format!("no answer within {connect:?}"),
                });
            }
        };
        Ok(EtcdStore {
            client,
            endpoint,
            op_timeout: op,
        })
    }

    /// Runs `call` on a clone of the client under the operation deadline, mapping errors.
    async fn run<T, F, Fut>(&self, op: &str, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        match tokio::time::timeout(self.op_timeout, call(self.client.clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.map_err(op, e)),
            Err(_) => Err(StoreError::Timeout {
                op: format!("{op} at etcd {}", self.endpoint),
                after: self.op_timeout,
            }),
        }
    }

    /// etcd reports a watch from a compacted revision only after "created", asynchronously
    /// (its unsynced-watcher loop); a read at that revision fails at once, so `watch` can
    /// return the error the contract asks for. A compaction between this read and the watch
    /// still ends the watch's stream, which the caller handles anyway.
    async fn check_not_compacted(
        &self,
        op: &str,
        prefix: &str,
        from: i64,
    ) -> Result<(), StoreError> {
        let request = rpc::RangeRequest {
            revision: from,
            count_only: true,
            ..prefix_request(prefix)
        };
        match tokio::time::timeout(self.op_timeout, self.client.range(request)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) if status.code() == Code::OutOfRange => {
                if status.message().contains("compacted") {
                    Err(StoreError::Other(format!(
                        "{op} at etcd {}: compacted ({}); list again and watch from its \
                         revision + 1",
                        self.endpoint,
                        status.message()
                    )))
                } else {
                    // "a future revision": the watch waits for it, as the contract allows.
                    Ok(())
                }
            }
            Ok(Err(e)) => Err(self.map_err(op, e)),
            Err(_) => Err(StoreError::Timeout {
                op: format!("{op} at etcd {}", self.endpoint),
                after: self.op_timeout,
            }),
        }
    }

    fn map_err(&self, op: &str, status: Status) -> StoreError {
        match status.code() {
            // Transport failures reach us as Unavailable (no connection) or Unknown (a broken
            // HTTP/2 stream); Cancelled and Aborted come from a server going away.
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted => {
                StoreError::Unavailable {
                    endpoint: self.endpoint.clone(),
                    reason: format!("{op}: {status}"),
                }
            }
            Code::DeadlineExceeded => StoreError::Timeout {
                op: format!("{op} at etcd {}", self.endpoint),
                after: self.op_timeout,
            },
            _ => StoreError::Other(format!("{op} at etcd {}: {status}", self.endpoint)),
        }
    }

    /// Compacts etcd's history up to `revision`: watches from before it fail from then on.
    /// An operator's (and the tests') tool, not part of the [`Store`] contract.
    pub async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let op = format!("compact to {revision}");
        self.run(&op, |c| async move {
            c.compact(rpc::CompactionRequest {
                revision,
                physical: true,
            })
            .await
        })
        .await
        .map(|_| ())
    }
}

/// etcd's answer for a lease that is gone (expired, revoked, never granted).
fn is_lease_not_found(status: &Status) -> bool {
    status.code() == Code::NotFound && status.message().contains("lease not found")
}

fn get_request(key: &[u8]) -> rpc::RangeRequest {
    rpc::RangeRequest {
        key: key.to_vec(),
        ..rpc::RangeRequest::default()
    }
}

fn prefix_request(prefix: &str) -> rpc::RangeRequest {
    let (key, range_end) = prefix_range(prefix.as_bytes());
    rpc::RangeRequest {
        key,
        range_end,
        ..rpc::RangeRequest::default()
    }
}

fn revision(header: Option<&rpc::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision)
}

fn key_value(kv: rpc::KeyValue) -> Result<KeyValue, StoreError> {
    let key = String::from_utf8(kv.key).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        reason: format!("key is not UTF-8: {}", e.utf8_error()),
    })?;
    Ok(KeyValue {
        key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        // etcd's "no lease" is lease 0.
        lease: (kv.lease != 0).then_some(LeaseId(kv.lease)),
    })
}

fn watch_event(event: rpc::Event) -> Result<Option<WatchEvent>, StoreError> {
    let Some(kv) = event.kv else {
        return Ok(None);
    };
    Ok(Some(match rpc::EventType::try_from(event.r#type) {
        Ok(rpc::EventType::Put) => WatchEvent::Put(key_value(kv)?),
        Ok(rpc::EventType::Delete) => {
            // etcd sets a delete event's mod_revision to the revision of the delete.
            let mod_revision = kv.mod_revision;
            WatchEvent::Delete {
                key: key_value(kv)?.key,
                mod_revision,
            }
        }
        Err(_) => {
            return Err(StoreError::Corrupt {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                reason: format!("unknown watch event type {}", event.r#type),
            });
        }
    }))
}

fn put_request(key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> rpc::PutRequest {
    rpc::PutRequest {
        key: key.as_bytes().to_vec(),
        value,
        lease: lease.map_or(0, |l| l.0),
    }
}

/// Whole seconds, rounded up, at least one.
fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

impl Store for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {}", self.endpoint)
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>> {
        Box::pin(async move {
            let resp = self
                .run(&format!("get {key}"), |c| async move {
                    c.range(get_request(key.as_bytes())).await
                })
                .await?;
            resp.kvs.into_iter().next().map(key_value).transpose()
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<(Vec<KeyValue>, i64), StoreError>> {
        Box::pin(async move {
            let resp = self
                .run(&format!("list {prefix}"), |c| async move {
                    c.range(prefix_request(prefix)).await
                })
                .await?;
            let revision = revision(resp.header.as_ref());
            let kvs = resp
                .kvs
                .into_iter()
                .map(key_value)
                .collect::<Result<Vec<_>, _>>()?;
            Ok((kvs, revision))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<i64, StoreError>> {
        Box::pin(async move {
            let result = tokio::time::timeout(
                self.op_timeout,
                self.client.put(put_request(key, value, lease)),
            )
            .await;
            match result {
                Ok(Ok(resp)) => Ok(revision(resp.header.as_ref())),
                Ok(Err(e)) if is_lease_not_found(&e) => {
                    Err(StoreError::LeaseExpired(lease.map_or(0, |l| l.0)))
                }
                Ok(Err(e)) => Err(self.map_err(&format!("put {key}"), e)),
                Err(_) => Err(StoreError::Timeout {
                    op: format!("put {key} at etcd {}", self.endpoint),
                    after: self.op_timeout,
                }),
            }
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
            // A missing key compares as mod_revision 0 in etcd, so `expected == 0` is
            // create-only.
            let txn = rpc::TxnRequest {
                compare: vec![rpc::Compare {
                    result: rpc::CompareResult::Equal as i32,
                    target: rpc::CompareTarget::Mod as i32,
                    key: key.as_bytes().to_vec(),
                    target_union: Some(rpc::CompareWith::ModRevision(expected)),
                }],
                success: vec![rpc::RequestOp {
                    request: Some(rpc::Operation::Put(put_request(key, value, lease))),
                }],
                failure: vec![],
            };
            let result = tokio::time::timeout(self.op_timeout, self.client.txn(txn)).await;
            match result {
                Ok(Ok(resp)) => Ok(resp.succeeded),
                Ok(Err(e)) if is_lease_not_found(&e) => {
                    Err(StoreError::LeaseExpired(lease.map_or(0, |l| l.0)))
                }
                Ok(Err(e)) => Err(self.map_err(&format!("put_if {key}"), e)),
                Err(_) => Err(StoreError::Timeout {
                    op: format!("put_if {key} at etcd {}", self.endpoint),
                    after: self.op_timeout,
                }),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let resp = self
                .run(&format!("delete {key}"), |c| async move {
                    c.delete_range(rpc::DeleteRangeRequest {
                        key: key.as_bytes().to_vec(),
                        range_end: Vec::new(),
                    })
                    .await
                })
                .await?;
            Ok(resp.deleted > 0)
        })
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<usize, StoreError>> {
        Box::pin(async move {
            let resp = self
                .run(&format!("delete_prefix {prefix}"), |c| async move {
                    let (key, range_end) = prefix_range(prefix.as_bytes());
                    c.delete_range(rpc::DeleteRangeRequest { key, range_end })
                        .await
                })
                .await?;
            Ok(usize::try_from(resp.deleted).unwrap_or(0))
        })
    }

    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>> {
        Box::pin(async move {
            let secs = ttl_seconds(ttl);
            let resp = self
                .run(&format!("grant {secs}s lease"), |c| async move {
                    c.lease_grant(rpc::LeaseGrantRequest { ttl: secs, id: 0 })
                        .await
                })
                .await?;
            if !resp.error.is_empty() {
                return Err(StoreError::Other(format!(
                    "grant {secs}s lease at etcd {}: {}",
                    self.endpoint, resp.error
                )));
            }
            Ok(LeaseId(resp.id))
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let result =
                tokio::time::timeout(self.op_timeout, self.client.lease_keep_alive_once(lease.0))
                    .await;
            match result {
                // etcd answers a keep-alive of a lease it does not know with TTL 0.
                Ok(Ok(resp)) if resp.ttl <= 0 => Err(StoreError::LeaseExpired(lease.0)),
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) if is_lease_not_found(&e) => Err(StoreError::LeaseExpired(lease.0)),
                Ok(Err(e)) => Err(self.map_err(&format!("keep_alive lease {:x}", lease.0), e)),
                Err(_) => Err(StoreError::Timeout {
                    op: format!("keep_alive lease {:x} at etcd {}", lease.0, self.endpoint),
                    after: self.op_timeout,
                }),
            }
        })
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let result = tokio::time::timeout(
                self.op_timeout,
                self.client
                    .lease_revoke(rpc::LeaseRevokeRequest { id: lease.0 }),
            )
            .await;
            match result {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) if is_lease_not_found(&e) => Err(StoreError::LeaseExpired(lease.0)),
                Ok(Err(e)) => Err(self.map_err(&format!("revoke lease {:x}", lease.0), e)),
                Err(_) => Err(StoreError::Timeout {
                    op: format!("revoke lease {:x} at etcd {}", lease.0, self.endpoint),
                    after: self.op_timeout,
                }),
            }
        })
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: i64) -> BoxFuture<'a, Result<Watch, StoreError>> {
        Box::pin(async move {
            let op = format!("watch {prefix} from {from}");
            if from > 0 {
                self.check_not_compacted(&op, prefix, from).await?;
            }
            let (key, range_end) = prefix_range(prefix.as_bytes());
            let create = rpc::WatchCreateRequest {
                key,
                range_end,
                start_revision: from.max(0),
            };
            // Establishing means etcd's "created" answer has arrived: from then on, "from
            // now" (0) is pinned and no event after it can be missed.
            let (stream, first) = self
                .run(&op, |c| async move {
                    let mut stream = c.watch(create).await?;
                    let first = stream.message().await?;
                    Ok((stream, first))
                })
                .await?;
            let Some(first) = first else {
                return Err(StoreError::Unavailable {
                    endpoint: self.endpoint.clone(),
                    reason: format!("{op}: the stream closed before the watch was created"),
                });
            };
            if first.canceled {
                return Err(if first.compact_revision > 0 {
                    StoreError::Other(format!(
                        "{op} at etcd {}: compacted (etcd keeps revisions from {} on); list \
                         again and watch from its revision + 1",
                        self.endpoint, first.compact_revision
                    ))
                } else {
                    StoreError::Other(format!(
                        "{op} at etcd {}: cancelled: {}",
                        self.endpoint, first.cancel_reason
                    ))
                });
            }
            let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
            tokio::spawn(forward(stream, first, tx));
            Ok(Watch { events: rx })
        })
    }
}

/// Forwards events until etcd's stream ends, breaks or cancels the watch, or the reader goes
/// away. Ending drops `tx`, which is how the reader learns to re-list.
async fn forward(
    mut stream: tonic::Streaming<rpc::WatchResponse>,
    first: rpc::WatchResponse,
    tx: mpsc::Sender<WatchEvent>,
) {
    let mut next = Some(first);
    loop {
        let resp = match next.take() {
            Some(resp) => resp,
            None => {
                let message = tokio::select! {
                    () = tx.closed() => return,
                    message = stream.message() => message,
                };
                match message {
                    Ok(Some(resp)) => resp,
                    Ok(None) | Err(_) => return,
                }
            }
        };
        let canceled = resp.canceled;
        for event in resp.events {
            match watch_event(event) {
                Ok(Some(event)) => {
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                // A key the contract cannot represent: end the watch rather than skip a
                // change silently; the caller's re-list reports the key.
                Err(_) => return,
            }
        }
        if canceled {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(ttl_seconds(Duration::from_secs(7)), 7);
    }
}
