//! The expert node's side of the control plane: it registers under a lease (address, memory,
//! what it holds), watches its `assign/{name}` key, loads or drops experts to match it, and
//! reports what it holds — the acknowledgement the controller waits for before it publishes a
//! placement that routes to the new copies.

use std::sync::Arc;
use std::time::Duration;

use myriad_wire::ExpertSet;
use tokio::sync::watch;

use crate::keys::Keys;
use crate::membership::Registration;
use crate::records::{Assignment, ExpertNodeRecord, decode, encode};
use crate::store::{Store, WatchEvent};

/// What the agent needs from the expert node's shard (the expert node implements it; tests
/// use a fake).
pub trait ExpertHolder: Send + Sync + 'static {
    fn held(&self) -> ExpertSet;
    /// Makes the node hold exactly `set` (blocking: loads from the checkpoint).
    fn set_experts(&self, set: &ExpertSet) -> Result<(), String>;

    /// The same for a change that is not urgent (a rebalance or drain rather than a failover):
    /// the holder may load more slowly so that serving is not disturbed.
    fn set_experts_in_background(&self, set: &ExpertSet) -> Result<(), String> {
        self.set_experts(set)
    }

    /// Runs `load` (one of the calls above) on a thread of its own, off the async runtime;
    /// `background`: a non-urgent change, which the holder may run at the lowest CPU priority.
    /// The default is a plain thread.
    fn spawn_loader(
        &self,
        background: bool,
        load: Box<dyn FnOnce() + Send>,
    ) -> std::io::Result<()> {
        let _ = background;
        std::thread::Builder::new()
            .name("myriad-load".to_string())
            .spawn(load)
            .map(drop)
    }
}

/// Registers the node and applies its assignments until `shutdown` turns true.
pub async fn serve_assignments(
    store: Arc<dyn Store>,
    keys: Keys,
    registration: Arc<Registration>,
    mut record: ExpertNodeRecord,
    holder: Arc<dyn ExpertHolder>,
    mut shutdown: watch::Receiver<bool>,
) {
    let n = holder.held().universe();
    let key = keys.expert_node(&record.name);
    record.held = holder.held().to_string();
    let _ = registration.put(&key, encode(&record)).await;
    let assign_key = keys.assignment(&record.name);
    while !*shutdown.borrow() {
        let (kvs, rev) = match store.list(&assign_key).await {
            Ok(r) => r,
            Err(_) => {
                pause(&mut shutdown).await;
                continue;
            }
        };
        if let Some(kv) = kvs.iter().find(|kv| kv.key == assign_key) {
            apply(&registration, &key, &mut record, &holder, kv, n).await;
        }
        let Ok(mut w) = store.watch(&assign_key, rev + 1).await else {
            pause(&mut shutdown).await;
            continue;
        };
        loop {
            tokio::select! {
                ev = w.events.recv() => match ev {
                    Some(WatchEvent::Put(kv)) if kv.key == assign_key => {
                        apply(&registration, &key, &mut record, &holder, &kv, n).await;
                    }
                    Some(_) => {}
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

async fn apply(
    registration: &Registration,
    key: &str,
    record: &mut ExpertNodeRecord,
    holder: &Arc<dyn ExpertHolder>,
    kv: &crate::store::KeyValue,
    n: usize,
) {
    let Ok(a) = decode::<Assignment>(kv) else {
        return;
    };
    let want = if a.experts.trim().is_empty() {
        ExpertSet::none(n)
    } else {
        match ExpertSet::parse(&a.experts, n) {
            Ok(s) => s,
            Err(_) => return,
        }
    };
    if holder.held() != want {
        // Loading is CPU work on the cores that serve requests. A rebalance's loads run in the
        // background (lowest priority, paced); a failover's at full speed: steps wait for them.
        let (h, w, urgent) = (holder.clone(), want.clone(), a.urgent);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let loader = holder.clone();
        let spawned = loader.spawn_loader(
            !urgent,
            Box::new(move || {
                let _ = tx.send(if urgent {
                    h.set_experts(&w)
                } else {
                    h.set_experts_in_background(&w)
                });
            }),
        );
        let failure = match (spawned, rx.await) {
            (Err(e), _) => Some(format!("cannot start a loading thread: {e}")),
            (Ok(_), Ok(Ok(()))) => None,
            (Ok(_), Ok(Err(e))) => Some(e),
            (Ok(_), Err(_)) => Some("the loading thread died".to_string()),
        };
        // The controller waits for this record: tell it why the assignment failed, at once.
        record.load_error = failure.map(|e| format!("assignment {}: {e}", a.serial));
    } else {
        record.load_error = None;
    }
    record.applied_serial = a.serial;
    record.held = holder.held().to_string();
    let _ = registration.put(key, encode(record)).await;
}

async fn pause(shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        _ = shutdown.changed() => {}
    }
}
