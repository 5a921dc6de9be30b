//! The control-plane side of every role: the `--etcd`/`--cluster` flags, connecting to the
//! store, and for an attention node the tasks that follow the placement (and compete to run the
//! controller), report load and serve `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use myriad_control::follower::{FollowerConfig, PlacementSink, follow, wait_for_placement};
use myriad_control::{
    Controller, ControllerConfig, EtcdStore, Keys, MemoryStore, Registration, Store,
};
use myriad_router::RemoteExperts;
use tokio::sync::watch;

/// Where the control plane lives.
#[derive(Args, Clone, Debug, Default)]
pub struct ControlArgs {
    /// etcd endpoint(s) of the control plane, e.g. http://127.0.0.1:2379 (comma-separated), or
    /// `memory` for an in-memory control plane inside this process (with
    /// `--in-process-experts`).
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The cluster's name: every key lives under /myriad/NAME/.
    #[arg(long = "cluster", default_value = "default")]
    pub cluster_name: String,
    /// Lease time-to-live of this node's registration, in milliseconds (a node that stops is
    /// considered gone this long after its last keep-alive).
    #[arg(long, default_value_t = 3000)]
    pub lease_ttl_ms: u64,
}

impl ControlArgs {
    pub fn enabled(&self) -> bool {
        !self.etcd.is_empty()
    }

    /// Whether the control plane is the in-memory one.
    pub fn is_memory(&self) -> bool {
        self.etcd.len() == 1 && self.etcd[0] == "memory"
    }

    pub fn keys(&self) -> Keys {
        let name = if self.cluster_name.is_empty() {
            "default"
        } else {
            &self.cluster_name
        };
        Keys::new(name)
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(if self.lease_ttl_ms == 0 {
            3000
        } else {
            self.lease_ttl_ms
        })
    }

    /// Connects to etcd (inside `runtime`).
    pub fn store(&self, runtime: &tokio::runtime::Runtime) -> Result<Arc<dyn Store>> {
        if self.is_memory() {
            return Ok(memory_store());
        }
        let store = runtime
            .block_on(EtcdStore::connect(&self.etcd))
            .with_context(|| format!("connecting to etcd at {}", self.etcd.join(",")))?;
        Ok(Arc::new(store))
    }
}

/// An in-memory control plane (the embedded default).
pub fn memory_store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

/// The attention node's control-plane tasks; stopping them (drop) leaves the cluster cleanly.
pub struct AttentionControl {
    shutdown: watch::Sender<bool>,
    registration: Option<Arc<Registration>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    runtime: tokio::runtime::Handle,
    pub store: Arc<dyn Store>,
    pub keys: Keys,
    pub name: String,
    /// Where `/metrics` is served, when it is.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Drop for AttentionControl {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(r) = self.registration.take()
            && let Ok(r) = Arc::try_unwrap(r)
        {
            let _ = self
                .runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(2), r.leave()).await });
        }
    }
}

/// Settings of the attention side's control-plane tasks.
#[derive(Clone, Debug)]
pub struct AttentionControlConfig {
    pub name: String,
    pub controller: ControllerConfig,
    pub placement_timeout: Duration,
    pub follower: FollowerConfig,
}

/// Registers this attention node, starts a controller candidate, and waits for the first
/// placement. Returns the tasks and the placement to start the router with.
pub fn start_attention(
    runtime: &tokio::runtime::Runtime,
    store: Arc<dyn Store>,
    keys: Keys,
    ttl: Duration,
    config: AttentionControlConfig,
) -> Result<(AttentionControl, myriad_control::records::PlacementDoc)> {
    let registration = Arc::new(
        runtime
            .block_on(Registration::new(store.clone(), ttl))
            .context("registering with the control plane")?,
    );
    let (shutdown, rx) = watch::channel(false);
    let controller = Controller::new(
        store.clone(),
        keys.clone(),
        registration.clone(),
        &config.name,
        config.controller.clone(),
    );
    let tasks = vec![runtime.spawn(controller.run(rx))];
    let doc = runtime
        .block_on(wait_for_placement(&*store, &keys, config.placement_timeout))
        .context("waiting for the control plane's first placement")?;
    Ok((
        AttentionControl {
            shutdown,
            registration: Some(registration),
            tasks,
            runtime: runtime.handle().clone(),
            store,
            keys,
            name: config.name,
            metrics_addr: None,
        },
        doc,
    ))
}

impl AttentionControl {
    /// Starts following placements into `router` and reporting version and load.
    pub fn follow(&mut self, router: Arc<RemoteExperts>, config: FollowerConfig) {
        let Some(registration) = self.registration.clone() else {
            return;
        };
        let sink: Arc<dyn PlacementSink> = Arc::new(crate::adapters::RouterSink(router));
        self.tasks.push(self.runtime.spawn(follow(
            self.store.clone(),
            self.keys.clone(),
            registration,
            self.name.clone(),
            sink,
            config,
            self.shutdown.subscribe(),
        )));
    }
}
