//! Where the routed experts run, and the flags that say so.
//!
//! - no cluster flags: every expert in this process (the single-process engine);
//! - `--expert-nodes ADDR,…` or `--placement FILE`: the router sends each layer's rows to expert
//!   nodes over QUIC with mutual TLS (`--tls-*`) or development certificates;
//! - `--in-process` with a placement: the same router and the same per-node shards, but every
//!   node inside this process on the in-process transport. Its combine order is the networked
//!   cluster's, so it reproduces a networked run bit for bit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use myriad_control::expert_agent::serve_assignments;

use crate::adapters::PacedShard;
use crate::device::Device;
use myriad_control::follower::FollowerConfig;
use myriad_control::records::ExpertNodeRecord;
use myriad_control::{ControllerConfig, Registration};
use myriad_expert::{ExpertService, ExpertShard, NodeIdentity};
use myriad_model::moe::ExpertExecutor;
use myriad_model::{Checkpoint, ExpertSet, ModelConfig};
use myriad_router::{Placement, RemoteExperts, RouterConfig};
use myriad_wire::Limits;

use crate::control::{AttentionControl, AttentionControlConfig, ControlArgs, start_attention};
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
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["placement", "etcd"])]
    pub expert_nodes: Vec<String>,
    /// Take the placement from the control plane (--etcd) and follow its changes.
    #[command(flatten)]
    pub control: ControlArgs,
    /// This attention node's name in the control plane (default: attention-PID).
    #[arg(long)]
    pub node_name: Option<String>,
    /// With --etcd: expert nodes to wait for before the first placement is made.
    #[arg(long, default_value_t = 1)]
    pub min_expert_nodes: usize,
    /// With --etcd: extra copies of hot experts a rebalance may make.
    #[arg(long, default_value_t = 0)]
    pub extra_replicas: usize,
    /// With --etcd: rebalance by itself when max/mean node load exceeds this.
    #[arg(long)]
    pub auto_rebalance_above: Option<f64>,
    /// With --etcd: how long a step waits for a new placement when an expert has no live
    /// holder (its node died and the controller is reassigning), in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub failover_wait_ms: u64,
    /// Run N expert nodes inside this process (in-process transport), placed by a control
    /// plane: the in-memory one unless --etcd names another. The whole cluster's machinery
    /// (registration, placement, rebalancing, failover) in one process.
    #[arg(long, default_value_t = 0)]
    pub in_process_experts: usize,
    /// Serve Prometheus metrics on this address (GET /metrics).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Also report token counts per layer (a label set 1 + layers times larger).
    #[arg(long)]
    pub metrics_per_layer: bool,
    /// With --expert-nodes: how many nodes hold each expert (a ring of replicas).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// A placement file: nodes, their addresses and the experts each holds.
    #[arg(long, conflicts_with = "etcd")]
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
            failover_wait: if self.control.enabled() || self.in_process_experts > 0 {
                Duration::from_millis(self.failover_wait_ms)
            } else {
                Duration::ZERO
            },
            ..default
        }
    }
}

/// What keeps a cluster's experts reachable (runtime, in-process servers) for as long as the
/// engine lives.
pub struct ExpertsHandle {
    pub executor: Arc<dyn ExpertExecutor<Device>>,
    /// The router, when experts are on nodes (for statistics).
    pub router: Option<Arc<RemoteExperts>>,
    /// The in-process network, when nodes run inside this process (tests stop nodes with it).
    pub network: Option<LocalNetwork>,
    /// Bytes one routed expert occupies (what a token routed to it reads).
    pub expert_bytes: usize,
    /// The control-plane tasks, with --etcd (dropped before the runtime).
    pub control: Option<AttentionControl>,
    /// Expert nodes running inside this process (`--in-process-experts`).
    pub in_process: Option<InProcessExperts>,
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
    dir: &Path,
    backend: &Arc<Device>,
    config: &ModelConfig,
    ckpt: &Checkpoint,
    cluster: &ClusterArgs,
    tls: &TlsArgs,
) -> Result<ExpertsHandle> {
    if cluster.control.enabled() || cluster.in_process_experts > 0 {
        return controlled_experts(dir, backend, config, ckpt, cluster, tls);
    }
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
            control: None,
            in_process: None,
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
            (Arc::new(connector), None, routed_expert_bytes(config, ckpt))
        };
    let (router, executor, acks) = connect_router(
        backend,
        config,
        cluster,
        &runtime,
        0,
        placement,
        connector,
        "attention",
    )?;
    for a in &acks {
        eprintln!(
            "expert node {} ready: {} experts of {} layers",
            a.node,
            a.held.len(),
            a.num_layers
        );
    }
    Ok(ExpertsHandle {
        executor,
        router: Some(router),
        network,
        expert_bytes,
        control: None,
        in_process: None,
        runtime: Some(runtime),
    })
}

/// Expert nodes inside this process: each a growable shard served on the in-process network,
/// registered with the control plane and holding what its assignment says (as a `myriad node
/// expert --etcd` process would).
pub struct InProcessExperts {
    pub network: LocalNetwork,
    stop: tokio::sync::watch::Sender<bool>,
    agents: Vec<tokio::task::JoinHandle<()>>,
}

impl InProcessExperts {
    fn start(
        runtime: &tokio::runtime::Runtime,
        store: Arc<dyn myriad_control::Store>,
        control: &ControlArgs,
        dir: &Path,
        backend: &Arc<Device>,
        config: &ModelConfig,
        nodes: usize,
    ) -> Result<Self> {
        let ckpt = Arc::new(
            Checkpoint::open(dir, config)
                .with_context(|| format!("opening the checkpoint in {}", dir.display()))?,
        );
        let network = LocalNetwork::new();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut agents = Vec::new();
        let expert_bytes = (routed_expert_bytes(config, &ckpt) * config.num_layers) as u64;
        for i in 0..nodes {
            let name = format!("e{i}");
            let addr = format!("in-process/{name}");
            let shard = Arc::new(
                ExpertShard::load_growable(
                    backend.clone(),
                    config,
                    ckpt.clone(),
                    &ExpertSet::none(config.num_experts),
                )
                .with_context(|| format!("starting in-process expert node {name}"))?,
            );
            network.register(
                addr.clone(),
                Arc::new(ExpertService::new(
                    shard.clone(),
                    identity(config, &name),
                    Limits::default(),
                )),
            );
            let registration = Arc::new(
                runtime
                    .block_on(Registration::new(store.clone(), control.lease_ttl()))
                    .context("registering an in-process expert node")?,
            );
            let record = ExpertNodeRecord {
                name,
                addr,
                // Equal shares: the initial placement splits the experts evenly.
                memory_bytes: expert_bytes.saturating_mul(config.num_experts as u64),
                expert_bytes,
                held: String::new(),
                model_fingerprint: config.fingerprint(),
                metrics_addr: None,
                applied_serial: 0,
                load_error: None,
            };
            agents.push(runtime.spawn(serve_assignments(
                store.clone(),
                control.keys(),
                registration,
                record,
                Arc::new(PacedShard {
                    shard,
                    background_duty: 1.0,
                }),
                stopped.clone(),
            )));
        }
        Ok(InProcessExperts {
            network,
            stop,
            agents,
        })
    }
}

impl Drop for InProcessExperts {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for a in self.agents.drain(..) {
            a.abort();
        }
    }
}

/// The router, the engine's executor over it, and the nodes' handshake answers.
type ConnectedRouter = (
    Arc<RemoteExperts>,
    Arc<dyn ExpertExecutor<Device>>,
    Vec<myriad_wire::HelloAck>,
);

/// A router over `placement` (at `version`) that has shaken hands with every node, and the
/// engine's executor over it on `backend`.
fn connect_router(
    backend: &Arc<Device>,
    config: &ModelConfig,
    cluster: &ClusterArgs,
    runtime: &tokio::runtime::Runtime,
    version: u64,
    placement: Placement,
    connector: Arc<dyn Connector>,
    client: &str,
) -> Result<ConnectedRouter> {
    let router = Arc::new(RemoteExperts::with_version(
        version,
        placement,
        connector,
        runtime.handle().clone(),
        config.hidden_size,
        config.num_layers,
        cluster.router_config(),
    ));
    let acks = router
        .handshake(client, config.fingerprint())
        .context("connecting to the expert nodes")?;
    let executor = Arc::new(crate::adapters::RemoteExecutor {
        router: router.clone(),
        backend: backend.clone(),
    });
    Ok((router, executor, acks))
}

/// Bytes one routed expert of one layer occupies in the checkpoint's dtype.
pub fn routed_expert_bytes(config: &ModelConfig, ckpt: &Checkpoint) -> usize {
    ckpt.expert(0, 0)
        .map(|t| t.gate_proj.data.len() + t.up_proj.data.len() + t.down_proj.data.len())
        .unwrap_or(3 * config.hidden_size * config.moe_intermediate_size * 2)
}

/// The router over QUIC with its placement from the control plane: registers this attention
/// node, runs a controller candidate, waits for the first placement, follows later ones.
fn controlled_experts(
    dir: &Path,
    backend: &Arc<Device>,
    config: &ModelConfig,
    ckpt: &Checkpoint,
    cluster: &ClusterArgs,
    tls: &TlsArgs,
) -> Result<ExpertsHandle> {
    let runtime = io_runtime()?;
    let store = if cluster.control.enabled() {
        cluster.control.store(&runtime)?
    } else {
        crate::control::memory_store()
    };
    let in_process = (cluster.in_process_experts > 0)
        .then(|| {
            InProcessExperts::start(
                &runtime,
                store.clone(),
                &cluster.control,
                dir,
                backend,
                config,
                cluster.in_process_experts,
            )
        })
        .transpose()?;
    let name = cluster
        .node_name
        .clone()
        .unwrap_or_else(|| format!("attention-{}", std::process::id()));
    let mut controller = ControllerConfig::new(config.num_experts);
    controller.min_expert_nodes = cluster
        .min_expert_nodes
        .max(cluster.in_process_experts)
        .max(1);
    controller.replicas = cluster.replicas.max(1);
    controller.extra_replicas = cluster.extra_replicas;
    controller.auto_rebalance_above = cluster.auto_rebalance_above;
    let follower = FollowerConfig {
        metrics_addr: cluster.metrics_addr.map(|a| a.to_string()),
        ..FollowerConfig::default()
    };
    let (mut control, doc) = start_attention(
        &runtime,
        store,
        cluster.control.keys(),
        cluster.control.lease_ttl(),
        AttentionControlConfig {
            name: name.clone(),
            controller,
            placement_timeout: Duration::from_secs(300),
            follower: follower.clone(),
        },
    )?;
    let placement = doc
        .to_placement()
        .with_context(|| format!("the control plane's placement version {}", doc.version))?;
    let connector: Arc<dyn Connector> = match &in_process {
        Some(nodes) => Arc::new(nodes.network.connector()),
        None => {
            let tls = tls.config()?;
            let _guard = runtime.enter();
            Arc::new(
                QuicConnector::new(&tls, QuicLimits::default())
                    .context("starting the QUIC client")?,
            )
        }
    };
    let (router, executor, acks) = connect_router(
        backend,
        config,
        cluster,
        &runtime,
        doc.version,
        placement,
        connector,
        &name,
    )?;
    eprintln!(
        "attention node {name}: placement version {} ({}), {} expert nodes",
        doc.version,
        doc.reason,
        acks.len()
    );
    control.follow(router.clone(), follower);
    if let Some(addr) = cluster.metrics_addr {
        control.metrics_addr = Some(crate::metrics::serve_attention_metrics(
            &runtime,
            addr,
            &name,
            router.clone(),
            &control,
            cluster.metrics_per_layer,
        )?);
    }
    Ok(ExpertsHandle {
        executor,
        router: Some(router),
        network: None,
        expert_bytes: routed_expert_bytes(config, ckpt),
        control: Some(control),
        in_process,
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
    backend: Arc<Device>,
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
    Ok(serve_shard(runtime, shard, config, name, listen, tls)?.0)
}

/// Serves `shard` on `listen` until the returned server is dropped.
pub fn serve_shard(
    runtime: &tokio::runtime::Runtime,
    shard: Arc<ExpertShard<Device>>,
    config: &ModelConfig,
    name: &str,
    listen: SocketAddr,
    tls: &TlsConfig,
) -> Result<(QuicServer, ExpertService<Device>)> {
    let service = ExpertService::new(shard, identity(config, name), Limits::default());
    let _guard = runtime.enter();
    let server = QuicServer::bind(
        listen,
        tls,
        QuicLimits::default(),
        Arc::new(service.clone()),
    )
    .with_context(|| format!("listening on {listen}"))?;
    Ok((server, service))
}
