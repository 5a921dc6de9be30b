//! [`EtcdStore`]: the [`Store`] contract on etcd (v3 API, `etcd-client`), plus the mapping of
//! etcd's errors to [`StoreError`]s that name the endpoint.
//!
//! Every operation runs under a deadline ([`DEFAULT_OP_TIMEOUT`]), because the client's own
//! request timeout does not cover waiting for a connection. A watch is forwarded by a task
//! that ends (closing the receiver) when etcd's stream breaks, is cancelled or errs, so the
//! caller re-lists and re-watches as the contract says.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use crate::store::{BoxFuture, KeyValue, LeaseId, Store, StoreError, Watch, WatchEvent};

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
        if endpoints.is_empty() {
            return Err(StoreError::Other("no etcd endpoints given".to_string()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(connect)
            .with_timeout(op)
            // etcd (grpc-go) answers pings on idle connections and pings more often than
            // every 5 s with GOAWAY; only ping while a watch or call is open.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(false);
        let attempt = async {
            let client = Client::connect(endpoints, Some(options)).await?;
            // The channel connects lazily; a read proves etcd is there and serving.
            client.kv_client().get("/", None).await?;
            Ok::<_, etcd_client::Error>(client)
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
        Fut: Future<Output = Result<T, etcd_client::Error>>,
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
        let options = GetOptions::new()
            .with_prefix()
            .with_revision(from)
            .with_count_only();
        let mut client = self.client.clone();
        match tokio::time::timeout(self.op_timeout, client.get(prefix, Some(options))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(etcd_client::Error::GRpcStatus(status)))
                if status.code() == tonic::Code::OutOfRange =>
            {
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

    fn map_err(&self, op: &str, e: etcd_client::Error) -> StoreError {
        use etcd_client::Error as E;
        use tonic::Code;
        let unavailable = |reason: String| StoreError::Unavailable {
            endpoint: self.endpoint.clone(),
            reason: format!("{op}: {reason}"),
        };
        match e {
            E::TransportError(e) => unavailable(e.to_string()),
            E::IoError(e) => unavailable(e.to_string()),
            E::GRpcStatus(status) => match status.code() {
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted => {
                    unavailable(status.to_string())
                }
                Code::DeadlineExceeded => StoreError::Timeout {
                    op: format!("{op} at etcd {}", self.endpoint),
                    after: self.op_timeout,
                },
                _ => StoreError::Other(format!("{op} at etcd {}: {status}", self.endpoint)),
            },
            other => StoreError::Other(format!("{op} at etcd {}: {other}", self.endpoint)),
        }
    }
}

/// etcd's answer for a lease that is gone (expired, revoked, never granted).
fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::NotFound && status.message().contains("lease not found")
        }
        etcd_client::Error::LeaseKeepAliveError(msg) => msg.contains("lease not found"),
        _ => false,
    }
}

fn key_value(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    let key = kv.key_str().map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        reason: format!("key is not UTF-8: {e}"),
    })?;
    Ok(KeyValue {
        key: key.to_string(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        // etcd's "no lease" is lease 0.
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    })
}

fn watch_event(event: &etcd_client::Event) -> Result<Option<WatchEvent>, StoreError> {
    let Some(kv) = event.kv() else {
        return Ok(None);
    };
    Ok(Some(match event.event_type() {
        EventType::Put => WatchEvent::Put(key_value(kv)?),
        EventType::Delete => WatchEvent::Delete {
            key: key_value(kv)?.key,
            // etcd sets a delete event's mod_revision to the revision of the delete.
            mod_revision: kv.mod_revision(),
        },
    }))
}

fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l.0))
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
                .run(&format!("get {key}"), |mut c| async move {
                    c.get(key, None).await
                })
                .await?;
            resp.kvs().first().map(key_value).transpose()
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<(Vec<KeyValue>, i64), StoreError>> {
        Box::pin(async move {
            let resp = self
                .run(&format!("list {prefix}"), |mut c| async move {
                    c.get(prefix, Some(GetOptions::new().with_prefix())).await
                })
                .await?;
            let revision = resp.header().map_or(0, |h| h.revision());
            let kvs = resp
                .kvs()
                .iter()
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
                self.client.clone().put(key, value, put_options(lease)),
            )
            .await;
            match result {
                Ok(Ok(resp)) => Ok(resp.header().map_or(0, |h| h.revision())),
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
            let txn = Txn::new()
                .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
                .and_then([TxnOp::put(key, value, put_options(lease))]);
            let result = tokio::time::timeout(self.op_timeout, self.client.clone().txn(txn)).await;
            match result {
                Ok(Ok(resp)) => Ok(resp.succeeded()),
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
                .run(&format!("delete {key}"), |mut c| async move {
                    c.delete(key, None).await
                })
                .await?;
            Ok(resp.deleted() > 0)
        })
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<usize, StoreError>> {
        Box::pin(async move {
            let resp = self
                .run(&format!("delete_prefix {prefix}"), |mut c| async move {
                    c.delete(prefix, Some(DeleteOptions::new().with_prefix()))
                        .await
                })
                .await?;
            Ok(usize::try_from(resp.deleted()).unwrap_or(0))
        })
    }

    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, StoreError>> {
        Box::pin(async move {
            let secs = ttl_seconds(ttl);
            let resp = self
                .run(&format!("grant {secs}s lease"), |mut c| async move {
                    c.lease_grant(secs, None).await
                })
                .await?;
            if !resp.error().is_empty() {
                return Err(StoreError::Other(format!(
                    "grant {secs}s lease at etcd {}: {}",
                    self.endpoint,
                    resp.error()
                )));
            }
            Ok(LeaseId(resp.id()))
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // `lease_keep_alive` opens the LeaseKeepAlive stream, sends one request and reads
            // one response (TTL <= 0 there is "lease not found"); dropping the keeper and the
            // stream closes it again.
            let result = tokio::time::timeout(
                self.op_timeout,
                self.client.clone().lease_keep_alive(lease.0),
            )
            .await;
            match result {
                Ok(Ok(_keeper_and_stream)) => Ok(()),
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
            let result =
                tokio::time::timeout(self.op_timeout, self.client.clone().lease_revoke(lease.0))
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
            let mut options = WatchOptions::new().with_prefix();
            if from > 0 {
                self.check_not_compacted(&op, prefix, from).await?;
                options = options.with_start_revision(from);
            }
            // Establishing means etcd's "created" answer has arrived: from then on, "from
            // now" (0) is pinned and no event after it can be missed.
            let (stream, first) = self
                .run(&op, |mut c| async move {
                    let mut stream = c.watch(prefix, Some(options)).await?;
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
            if first.canceled() {
                return Err(if first.compact_revision() > 0 {
                    StoreError::Other(format!(
                        "{op} at etcd {}: compacted (etcd keeps revisions from {} on); list \
                         again and watch from its revision + 1",
                        self.endpoint,
                        first.compact_revision()
                    ))
                } else {
                    StoreError::Other(format!(
                        "{op} at etcd {}: cancelled: {}",
                        self.endpoint,
                        first.cancel_reason()
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
    mut stream: etcd_client::WatchStream,
    first: etcd_client::WatchResponse,
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
        for event in resp.events() {
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
        if resp.canceled() {
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
