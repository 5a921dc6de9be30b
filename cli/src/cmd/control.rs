//! `myriad control nodes|placement|status|rebalance|drain|run`: inspect and steer a cluster's
//! control plane (`run`: a controller candidate as its own process). Changes are requests the
//! elected controller carries out (make-before-break); these commands write the request and
//! wait, bounded, for its outcome.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use myriad_control::records::{Request, encode};
use myriad_control::{ClusterView, Controller, ControllerConfig, Registration, Store, eplb};
use serde_json::json;

use crate::cluster::io_runtime;
use crate::control::ControlArgs;

#[derive(Subcommand, Debug)]
pub enum ControlCmd {
    /// Expert and attention nodes that hold a live lease.
    Nodes(ControlOpts),
    /// The current placement version: which node serves which experts.
    Placement(ControlOpts),
    /// The controller, placement version, load imbalance, rebalances and failovers.
    Status(ControlOpts),
    /// Ask the controller to rebalance by the reported load, and wait for the outcome.
    Rebalance(RebalanceArgs),
    /// Move every expert off NODE (to its replicas or other nodes), and wait until done.
    Drain(DrainArgs),
    /// Run a controller candidate as its own process (attention nodes run one too; the
    /// elected one acts), until SIGINT or SIGTERM.
    Run(RunArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The model directory (only `config.json` is read: the number of experts).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub control: ControlArgs,
    /// This controller's name (default: controller-PID).
    #[arg(long)]
    pub name: Option<String>,
    /// Expert nodes to wait for before the first placement.
    #[arg(long, default_value_t = 1)]
    pub min_expert_nodes: usize,
    /// Copies of every expert in the first placement.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Extra copies of hot experts a rebalance may make.
    #[arg(long, default_value_t = 0)]
    pub extra_replicas: usize,
    /// Rebalance by itself when max/mean node load exceeds this.
    #[arg(long)]
    pub auto_rebalance_above: Option<f64>,
}

/// `myriad control run`: a controller candidate in its own process.
fn run_controller(a: &RunArgs) -> Result<()> {
    if !a.control.enabled() || a.control.is_memory() {
        bail!("a standalone controller needs a shared control plane: --etcd URL");
    }
    let config = myriad_model::ModelConfig::from_dir(&a.model)?;
    let runtime = io_runtime()?;
    let store = a.control.store(&runtime)?;
    let registration = std::sync::Arc::new(
        runtime
            .block_on(Registration::new(store.clone(), a.control.lease_ttl()))
            .context("registering with the control plane")?,
    );
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("controller-{}", std::process::id()));
    let mut cc = ControllerConfig::new(config.num_experts);
    cc.min_expert_nodes = a.min_expert_nodes.max(1);
    cc.replicas = a.replicas.max(1);
    cc.extra_replicas = a.extra_replicas;
    cc.auto_rebalance_above = a.auto_rebalance_above;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = runtime.spawn(
        Controller::new(store, a.control.keys(), registration.clone(), &name, cc).run(stopped),
    );
    eprintln!(
        "controller {name} standing for election under {}",
        a.control.keys().root()
    );
    crate::lifecycle::announce_ready(&name)?;
    runtime.block_on(crate::lifecycle::shutdown_signal());
    let _ = stop.send(true);
    let _ = runtime.block_on(task);
    if let Ok(r) = std::sync::Arc::try_unwrap(registration) {
        let _ = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(2), r.leave()).await });
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ControlOpts {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RebalanceArgs {
    #[command(flatten)]
    pub opts: ControlOpts,
    /// Extra copies of hot experts the rebalancer may make (default: the controller's setting).
    #[arg(long)]
    pub extra_replicas: Option<usize>,
    /// Longest wait for the outcome, in seconds.
    #[arg(long, default_value_t = 300)]
    pub wait_s: u64,
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The expert node to drain.
    pub node: String,
    #[command(flatten)]
    pub opts: ControlOpts,
    /// Longest wait, in seconds.
    #[arg(long, default_value_t = 300)]
    pub wait_s: u64,
}

pub fn run(cmd: &ControlCmd) -> Result<()> {
    let opts = match cmd {
        ControlCmd::Nodes(o) | ControlCmd::Placement(o) | ControlCmd::Status(o) => o,
        ControlCmd::Rebalance(r) => &r.opts,
        ControlCmd::Drain(d) => &d.opts,
        ControlCmd::Run(r) => return run_controller(r),
    };
    if !opts.control.enabled() {
        bail!("give the control plane's address: --etcd URL");
    }
    let runtime = io_runtime()?;
    let store = opts.control.store(&runtime)?;
    let keys = opts.control.keys();
    let view = |store: &dyn Store| {
        runtime
            .block_on(ClusterView::read(store, &keys))
            .with_context(|| format!("reading the cluster under {}", keys.root()))
    };
    match cmd {
        ControlCmd::Nodes(o) => print_nodes(&view(&*store)?, o.json),
        ControlCmd::Placement(o) => print_placement(&view(&*store)?, o.json),
        ControlCmd::Status(o) => print_status(&view(&*store)?, o.json),
        ControlCmd::Rebalance(r) => {
            let id = request_id();
            let req = Request {
                id,
                extra_replicas: r.extra_replicas,
            };
            runtime
                .block_on(store.put(&keys.rebalance_request(), encode(&req), None))
                .context("writing the rebalance request")?;
            let deadline = Instant::now() + Duration::from_secs(r.wait_s);
            loop {
                let v = view(&*store)?;
                if let Some(s) = v.status.as_ref().filter(|s| s.last_request == Some(id)) {
                    if r.opts.json {
                        println!(
                            "{}",
                            json!({"version": v.version(), "outcome": s.last_outcome,
                                "imbalance_before": s.imbalance_before,
                                "imbalance_after": s.imbalance_after,
                                "last_rebalance_seconds": s.last_rebalance_seconds})
                        );
                    } else {
                        println!("{}", s.last_outcome);
                    }
                    if s.last_outcome.starts_with("error") {
                        bail!("the rebalance failed: {}", s.last_outcome);
                    }
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!(
                        "no outcome after {}s (is an attention node running the controller? leader: {})",
                        r.wait_s,
                        v.leader.as_deref().unwrap_or("none")
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        ControlCmd::Run(_) => Ok(()),
        ControlCmd::Drain(d) => {
            let v = view(&*store)?;
            if v.expert_node(&d.node).is_none() {
                bail!("no live expert node named {}", d.node);
            }
            let req = Request {
                id: request_id(),
                extra_replicas: None,
            };
            runtime
                .block_on(store.put(&keys.drain_request(&d.node), encode(&req), None))
                .context("writing the drain request")?;
            let deadline = Instant::now() + Duration::from_secs(d.wait_s);
            loop {
                let v = view(&*store)?;
                let placed = v
                    .current
                    .as_ref()
                    .is_some_and(|c| c.nodes.iter().any(|n| n.name == d.node));
                if !placed && !v.drain_requests.contains(&d.node) {
                    if d.opts.json {
                        println!("{}", json!({"drained": d.node, "version": v.version()}));
                    } else {
                        println!(
                            "{} drained: placement version {} no longer routes to it",
                            d.node,
                            v.version()
                        );
                    }
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!("{} is still placed after {}s", d.node, d.wait_s);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn request_id() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

fn print_nodes(v: &ClusterView, as_json: bool) -> Result<()> {
    let n = v.current.as_ref().map_or(0, |d| d.num_experts);
    if as_json {
        println!(
            "{}",
            json!({
                "expert_nodes": v.expert_nodes.iter().map(|r| json!({
                    "name": r.name, "addr": r.addr, "held": r.held,
                    "held_count": if n > 0 { r.held_set(n).len() } else { 0 },
                    "memory_bytes": r.memory_bytes, "expert_bytes": r.expert_bytes,
                    "metrics_addr": r.metrics_addr,
                })).collect::<Vec<_>>(),
                "attention_nodes": v.attention_nodes.iter().map(|r| json!({
                    "name": r.name, "placement_version": r.placement_version,
                    "metrics_addr": r.metrics_addr,
                })).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    println!("expert nodes ({}):", v.expert_nodes.len());
    for r in &v.expert_nodes {
        println!(
            "  {:<16} {:<22} holds {:<24} memory {:.1} GiB",
            r.name,
            r.addr,
            if r.held.is_empty() { "-" } else { &r.held },
            r.memory_bytes as f64 / (1u64 << 30) as f64
        );
    }
    println!("attention nodes ({}):", v.attention_nodes.len());
    for r in &v.attention_nodes {
        println!("  {:<16} placement version {}", r.name, r.placement_version);
    }
    Ok(())
}

fn print_placement(v: &ClusterView, as_json: bool) -> Result<()> {
    let Some(doc) = &v.current else {
        bail!("no placement is published yet");
    };
    if as_json {
        println!("{}", serde_json::to_string(doc)?);
        return Ok(());
    }
    println!(
        "placement version {} ({}), {} experts",
        doc.version, doc.reason, doc.num_experts
    );
    for n in &doc.nodes {
        println!("  {:<16} {:<22} {}", n.name, n.addr, n.experts);
    }
    Ok(())
}

fn print_status(v: &ClusterView, as_json: bool) -> Result<()> {
    let n = v.current.as_ref().map_or(0, |d| d.num_experts);
    let load = v.load(n);
    let assignment: Vec<eplb::NodeAssignment> = v
        .placed_sets()
        .into_iter()
        .map(|(name, experts)| eplb::NodeAssignment { name, experts })
        .collect();
    let imbalance = eplb::imbalance(&assignment, &load);
    let tokens: f64 = load.iter().sum();
    let s = v.status.clone().unwrap_or_default();
    if as_json {
        println!(
            "{}",
            json!({
                "leader": v.leader, "placement_version": v.version(),
                "expert_nodes": v.expert_nodes.len(), "attention_nodes": v.attention_nodes.len(),
                "window_tokens": tokens, "imbalance": imbalance,
                "rebalances": s.rebalances, "rebalance_seconds_total": s.rebalance_seconds_total,
                "last_rebalance_seconds": s.last_rebalance_seconds,
                "failovers": s.failovers, "drains": s.drains,
                "imbalance_before_last_rebalance": s.imbalance_before,
                "imbalance_after_last_rebalance": s.imbalance_after,
                "last_outcome": s.last_outcome,
            })
        );
        return Ok(());
    }
    println!(
        "controller: {}",
        v.leader.as_deref().unwrap_or("none elected")
    );
    println!(
        "placement version {} over {} expert nodes; {} attention nodes",
        v.version(),
        v.expert_nodes.len(),
        v.attention_nodes.len()
    );
    println!("load window: {tokens:.0} tokens routed, imbalance (max/mean node) {imbalance:.3}");
    println!(
        "rebalances {} ({:.2}s total, last {:.2}s, imbalance {:.3} -> {:.3}); failovers {}; drains {}",
        s.rebalances,
        s.rebalance_seconds_total,
        s.last_rebalance_seconds,
        s.imbalance_before,
        s.imbalance_after,
        s.failovers,
        s.drains
    );
    if !s.last_outcome.is_empty() {
        println!("last: {}", s.last_outcome);
    }
    Ok(())
}
