//! Where the routed experts run, and the flags that say so.
//!
//! - no cluster flags: every expert in this process (the single-process engine);
//! - `--expert-nodes ADDR,…` or `--placement FILE`: the router sends each layer's rows to expert
//!   nodes over QUIC with mutual TLS (`--tls-*`) or development certificates;
//! - `--in-process` with a placement: the same router and the same per-node shards, but every
//!   node inside this process on the in-process transport. Its combine order is the networked
//!   cluster's, so it reproduces a networked run bit for bit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use myriad_expert::{ExpertService, ExpertShard, NodeIdentity};
use myriad_kernels::cpu::CpuBackend;
use myriad_model::moe::ExpertExecutor;
use myriad_model::wire::Limits;
use myriad_model::{Checkpoint, ExpertSet, ModelConfig};
use myriad_router::{Placement, RemoteExperts, RouterConfig};
use myriad_transport::{Connector, LocalNetwork, QuicConnector, QuicLimits, QuicServer, TlsConfig};

/// How nodes authenticate each other.
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// This node's certificate (PEM), signed by --tls-ca.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The cluster's CA certificate (PEM); peers must present certificates it signed.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The name every node certificate carries.
    #[arg(long, default_value = "myriad-node")]
    pub tls_server_name: String,
    /// Self-signed certificates and no peer verification: for development on one machine only.
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure_dev_certs: bool,
}

impl TlsArgs {
    /// The TLS configuration; prints the loud warning of development mode.
    pub fn config(&self) -> Result<TlsConfig> {
        let tls = match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => TlsConfig::Files {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                server_name: self.tls_server_name.clone(),
            },
            _ if self.insecure_dev_certs => TlsConfig::InsecureDev,
            _ => bail!(
                "nodes authenticate each other: give --tls-cert, --tls-key and --tls-ca (see `myriad certs`), or --insecure-dev-certs for a development setup"
            ),
        };
        if let Some(w) = tls.warning() {
            eprintln!("{w}");
        }
        Ok(tls)
    }
}

/// Where the routed experts run.
#[derive(Args, Clone, Debug, Default)]
pub struct ClusterArgs {
    /// Expert nodes to dispatch to; experts are split evenly over them (see --replicas).
    #[arg(long, value_delimiter = ',', conflicts_with = "placement")]
    pub expert_nodes: Vec<String>,
    /// With --expert-nodes: how many nodes hold each expert (a ring of replicas).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// A placement file: nodes, their addresses and the experts each holds.
    #[arg(long)]
    pub placement: Option<PathBuf>,
    /// Run the placement's nodes inside this process (no network; same combine order).
    #[arg(long)]
    pub in_process: bool,
    /// Longest wait for one expert node's reply to one layer step, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub expert_deadline_ms: u64,
    /// Split steps into two micro-batches so attention overlaps the expert round trip.
    #[arg(long)]
    pub ping_pong: bool,
}

impl ClusterArgs {
    /// The placement these flags describe (None: all experts in this process).
    pub fn placement(&self, num_experts: usize) -> Result<Option<Placement>> {
        if let Some(path) = &self.placement {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the placement {}", path.display()))?;
            return Ok(Some(Placement::from_json(
                &text,
                num_experts,
                &path.display().to_string(),
            )?));
        }
        if !self.expert_nodes.is_empty() {
            return Ok(Some(Placement::even(
                &self.expert_nodes,
                num_experts,
                self.replicas,
            )?));
        }
        if self.in_process {
            bail!("--in-process needs a placement (--placement or --expert-nodes)");
        }
        Ok(None)
    }

    pub fn router_config(&self) -> RouterConfig {
        let default = RouterConfig::default();
        // 0 (a struct built without clap's defaults) means the default deadline.
        let deadline = if self.expert_deadline_ms == 0 {
            default.deadline
        } else {
            Duration::from_millis(self.expert_deadline_ms)
        };
        RouterConfig {
            deadline,
            ..default
        }
    }
}

/// What keeps a cluster's experts reachable (runtime, in-process servers) for as long as the
/// engine lives.
pub struct ExpertsHandle {
    pub executor: Arc<dyn ExpertExecutor<CpuBackend>>,
    /// The router, when experts are on nodes (for statistics).
    pub router: Option<Arc<RemoteExperts<CpuBackend>>>,
    /// The in-process network, when nodes run inside this process (tests stop nodes with it).
    pub network: Option<LocalNetwork>,
    /// Bytes one routed expert occupies (what a token routed to it reads).
    pub expert_bytes: usize,
    pub runtime: Option<tokio::runtime::Runtime>,
}

/// A tokio runtime for the router's and servers' I/O (small: the CPU pool does the math).
pub fn io_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("myriad-io")
        .enable_all()
        .build()
        .context("starting the I/O runtime")
}

/// Builds the routed-expert executor for `cluster`.
pub fn experts(
    backend: &Arc<CpuBackend>,
    config: &ModelConfig,
    ckpt: &Checkpoint,
    cluster: &ClusterArgs,
    tls: &TlsArgs,
) -> Result<ExpertsHandle> {
    let Some(placement) = cluster.placement(config.num_experts)? else {
        let shard = Arc::new(
            ExpertShard::load(
                backend.clone(),
                config,
                ckpt,
                &ExpertSet::all(config.num_experts),
            )
            .context("loading routed experts")?,
        );
        let expert_bytes = shard.expert_bytes();
        return Ok(ExpertsHandle {
            executor: shard,
            router: None,
            network: None,
            expert_bytes,
            runtime: None,
        });
    };
    let runtime = io_runtime()?;
    let (connector, network, expert_bytes): (Arc<dyn Connector>, Option<LocalNetwork>, usize) =
        if cluster.in_process {
            let network = LocalNetwork::new();
            let mut bytes = 0;
            for node in placement.nodes() {
                let shard = Arc::new(
                    ExpertShard::load(backend.clone(), config, ckpt, &node.experts).with_context(
                        || format!("loading the experts of in-process node {}", node.name),
                    )?,
                );
                bytes = shard.expert_bytes();
                network.register(
                    node.addr.clone(),
                    Arc::new(ExpertService::new(
                        shard,
                        identity(config, &node.name),
                        Limits::default(),
                    )),
                );
            }
            (Arc::new(network.connector()), Some(network), bytes)
        } else {
            let tls = tls.config()?;
            let _guard = runtime.enter();
            let connector = QuicConnector::new(&tls, QuicLimits::default())
                .context("starting the QUIC client")?;
            let c = config;
            let bytes = 3 * c.hidden_size * c.moe_intermediate_size * 2;
            (Arc::new(connector), None, bytes)
        };
    let router = Arc::new(RemoteExperts::new(
        backend.clone(),
        placement,
        connector,
        runtime.handle().clone(),
        config.hidden_size,
        config.num_layers,
        cluster.router_config(),
    ));
    let acks = router
        .handshake("attention", config.fingerprint())
        .context("connecting to the expert nodes")?;
    for a in &acks {
        eprintln!(
            "expert node {} ready: {} experts of {} layers",
            a.node,
            a.held.len(),
            a.num_layers
        );
    }
    Ok(ExpertsHandle {
        executor: router.clone(),
        router: Some(router),
        network,
        expert_bytes,
        runtime: Some(runtime),
    })
}

/// This node's identity for a model.
pub fn identity(config: &ModelConfig, name: &str) -> NodeIdentity {
    NodeIdentity {
        name: name.to_string(),
        model_fingerprint: config.fingerprint(),
        num_layers: config.num_layers,
        num_experts: config.num_experts,
        hidden: config.hidden_size,
    }
}

/// Serves `set` of the model's experts on `listen` until the returned server is dropped.
pub fn serve_experts(
    runtime: &tokio::runtime::Runtime,
    backend: Arc<CpuBackend>,
    config: &ModelConfig,
    ckpt: &Checkpoint,
    set: &ExpertSet,
    name: &str,
    listen: SocketAddr,
    tls: &TlsConfig,
) -> Result<QuicServer> {
    let shard = Arc::new(
        ExpertShard::load(backend, config, ckpt, set).context("loading this node's experts")?,
    );
    let service = Arc::new(ExpertService::new(
        shard,
        identity(config, name),
        Limits::default(),
    ));
    let _guard = runtime.enter();
    QuicServer::bind(listen, tls, QuicLimits::default(), service)
        .with_context(|| format!("listening on {listen}"))
}
