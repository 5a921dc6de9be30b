//! `myriad bench dispatch`: the cost of putting experts on other nodes.
//!
//! 1. One layer's routed experts for batches of 1, 8 and 64 tokens: round-trip latency and
//!    bytes on the wire over QUIC on loopback (mutual TLS, four expert nodes served from this
//!    process) and over the in-process transport, beside the same experts run locally with no
//!    transport at all; bytes per token are compared with the minimum (each token reaches each
//!    node holding any of its experts once and comes back once: hidden × 4 bytes × nodes, each
//!    way).
//! 2. Whole-model decode at batch 32: the single process against four expert-node processes on
//!    loopback, with and without ping-pong micro-batches.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::device::Device;
use anyhow::{Context, Result};
use clap::Args;
use myriad_expert::{ExpertService, ExpertShard};
use myriad_kernels::Backend;
use myriad_model::moe::ExpertExecutor;
use myriad_model::{Checkpoint, Family, ModelConfig, Preset};
use myriad_router::{Placement, RemoteExperts, RouterConfig};
use myriad_transport::{
    Connector, LocalNetwork, QuicConnector, QuicLimits, QuicServer, generate_pki,
};
use myriad_wire::Limits;
use serde_json::{Value, json};

use crate::cluster::{ClusterArgs, identity, io_runtime};
use crate::cmd::bench::decode_run;
use crate::cmd::generate::OutputFormat;
use crate::cmd::launch::{LaunchArgs, start_cluster};
use crate::local::load_with;
use crate::runtime::RuntimeArgs;

#[derive(Args, Debug)]
pub struct DispatchArgs {
    /// Model directory (default: the built-in `bench` preset, made on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    /// Token batch sizes for the per-layer round trips.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub batch: Vec<usize>,
    /// Expert nodes.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Timed round trips per batch size.
    #[arg(long, default_value_t = 30)]
    pub repeats: usize,
    /// Batch size of the whole-model decode comparison.
    #[arg(long, default_value_t = 32)]
    pub decode_batch: usize,
    /// Timed decode steps.
    #[arg(long, default_value_t = 12)]
    pub decode_steps: usize,
    /// Skip the whole-model comparison (it starts expert-node processes).
    #[arg(long)]
    pub skip_decode: bool,
    /// Worker threads of each expert-node process.
    #[arg(long, default_value_t = 1)]
    pub node_threads: usize,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

struct RoundTrip {
    p50_ms: f64,
    mean_ms: f64,
}

fn time_runs(
    exec: &dyn ExpertExecutor<Device>,
    b: &Device,
    x: &<Device as Backend>::Tensor,
    routes: &myriad_kernels::Routes,
    h: usize,
    repeats: usize,
) -> Result<RoundTrip> {
    let rows = routes.rows();
    let mut out = b.zeros(rows, h);
    for _ in 0..3 {
        exec.run(0, x, routes, &mut out)?;
    }
    let mut ms: Vec<f64> = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t0 = Instant::now();
        exec.run(0, x, routes, &mut out)?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(RoundTrip {
        p50_ms: ms[ms.len() / 2],
        mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
    })
}

pub fn run(a: &DispatchArgs) -> Result<()> {
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => crate::builtin::ensure(Preset::Bench, Family::Qwen35Moe)?,
    };
    let config = ModelConfig::from_dir(&dir)?;
    let h = config.hidden_size;
    let mut layer_runs: Vec<Value> = Vec::new();
    {
        let ckpt = Checkpoint::open(&dir, &config)?;
        let opts = a.runtime.options();
        let backend = crate::device::backend(&opts);
        let runtime = io_runtime()?;
        let pki_dir = std::env::temp_dir().join(format!("myriad-bench-pki-{}", std::process::id()));
        let names: Vec<String> = (0..a.nodes).map(|i| format!("e{i}")).collect();
        let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
        all.push("attention");
        let pki = generate_pki(&pki_dir, &all, "myriad-node")?;
        // One shard per node, shared by both transports.
        let even = Placement::even(&names, config.num_experts, 1)?;
        let mut shards = Vec::new();
        for node in even.nodes() {
            shards.push(Arc::new(
                ExpertShard::load(backend.clone(), &config, &ckpt, &node.experts)
                    .context("loading a node's experts")?,
            ));
        }
        let local_all = ExpertShard::load(
            backend.clone(),
            &config,
            &ckpt,
            &myriad_model::ExpertSet::all(config.num_experts),
        )?;
        let network = LocalNetwork::new();
        let mut servers = Vec::new();
        let mut quic_addrs = Vec::new();
        for (node, shard) in even.nodes().iter().zip(&shards) {
            let service = Arc::new(ExpertService::new(
                shard.clone(),
                identity(&config, &node.name),
                Limits::default(),
            ));
            network.register(node.name.clone(), service.clone());
            let tls = pki.config(&node.name).context("node certificate")?;
            let _g = runtime.enter();
            let server = QuicServer::bind(
                "127.0.0.1:0".parse::<SocketAddr>()?,
                &tls,
                QuicLimits::default(),
                service,
            )?;
            quic_addrs.push(server.local_addr().to_string());
            servers.push(server);
        }
        let quic_placement = Placement::even(&quic_addrs, config.num_experts, 1)?;
        let client_tls = pki.config("attention").context("attention certificate")?;
        let quic: Arc<dyn Connector> = {
            let _g = runtime.enter();
            Arc::new(QuicConnector::new(&client_tls, QuicLimits::default())?)
        };
        let routers = [
            (
                "in-process",
                Arc::new(RemoteExperts::new(
                    even.clone(),
                    Arc::new(network.connector()),
                    runtime.handle().clone(),
                    h,
                    config.num_layers,
                    RouterConfig::default(),
                )),
            ),
            (
                "quic-loopback",
                Arc::new(RemoteExperts::new(
                    quic_placement,
                    quic,
                    runtime.handle().clone(),
                    h,
                    config.num_layers,
                    RouterConfig::default(),
                )),
            ),
        ];
        for (_, r) in &routers {
            r.handshake("bench", config.fingerprint())?;
        }
        let mut rng = myriad_attention::rng::Rng::new(7);
        for &n in &a.batch {
            let xs: Vec<f32> = (0..n * h).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let logits: Vec<f32> = (0..n * config.num_experts)
                .map(|_| rng.next_f64() as f32)
                .collect();
            let x = backend.upload(n, h, &xs)?;
            let routes = backend.route(
                &backend.upload(n, config.num_experts, &logits)?,
                config.num_experts_per_tok,
                true,
            );
            let local = time_runs(&local_all, &backend, &x, &routes, h, a.repeats)?;
            let mut entry = json!({"batch_tokens": n, "local_compute_ms_p50": local.p50_ms});
            for (name, r) in &routers {
                let before = r.stats();
                let exec = crate::adapters::RemoteExecutor {
                    router: r.clone(),
                    backend: backend.clone(),
                };
                let t = time_runs(&exec, &backend, &x, &routes, h, a.repeats)?;
                let after = r.stats();
                let calls = (a.repeats + 3) as f64;
                let bytes = ((after.bytes_sent + after.bytes_received)
                    - (before.bytes_sent + before.bytes_received))
                    as f64
                    / calls;
                let minimum = (after.minimum_bytes - before.minimum_bytes) as f64 / calls;
                let per_token = bytes / n as f64;
                eprintln!(
                    "dispatch {name:>13}, {n:>2} tokens: p50 {:.2} ms (mean {:.2}; local compute {:.2}), {:.0} bytes/token/layer on the wire = {:.3}x the minimum",
                    t.p50_ms,
                    t.mean_ms,
                    local.p50_ms,
                    per_token,
                    bytes / minimum
                );
                entry[name] = json!({
                    "round_trip_ms_p50": t.p50_ms,
                    "round_trip_ms_mean": t.mean_ms,
                    "overhead_ms_p50": t.p50_ms - local.p50_ms,
                    "bytes_per_token_per_layer": per_token,
                    "minimum_bytes_per_token_per_layer": minimum / n as f64,
                    "bytes_over_minimum": bytes / minimum,
                });
            }
            layer_runs.push(entry);
        }
        for s in &servers {
            s.shutdown();
        }
        let _ = std::fs::remove_dir_all(&pki_dir);
    }
    let mut decode = Value::Null;
    if !a.skip_decode {
        let single = {
            let e = crate::local::load(&dir, &a.runtime.options())?;
            decode_run(&e, a.decode_batch, 16, 2, a.decode_steps, 1, false)?.tokens_per_s
        };
        eprintln!(
            "decode batch {}: single process {single:.1} tokens/s",
            a.decode_batch
        );
        let exe = std::env::current_exe().context("locating the myriad binary")?;
        let launch = LaunchArgs {
            model: None,
            expert_nodes: a.nodes,
            replicas: 1,
            node_threads: a.node_threads,
            insecure_dev_certs: false,
            ping_pong: false,
            ready_timeout_s: 600,
            etcd: None,
            http: None,
            prefill_nodes: 0,
            decode_nodes: 1,
            disagg_min_prompt_tokens: 1024,
            kv_cache_gb: 4.0,
            runtime: a.runtime.clone(),
        };
        let cluster = start_cluster(&exe, &dir, &launch)?;
        let args = ClusterArgs {
            placement: Some(cluster.placement.clone()),
            ..ClusterArgs::default()
        };
        let e = load_with(&dir, &a.runtime.options(), &args, &cluster.tls)?;
        let plain = decode_run(&e, a.decode_batch, 16, 2, a.decode_steps, 1, false)?.tokens_per_s;
        let pp = decode_run(&e, a.decode_batch, 16, 2, a.decode_steps, 1, true)?.tokens_per_s;
        eprintln!(
            "decode batch {}: {}-node cluster {plain:.1} tokens/s ({:.2}x single), with ping-pong {pp:.1} tokens/s ({:.2}x)",
            a.decode_batch,
            a.nodes,
            plain / single,
            pp / single
        );
        decode = json!({
            "batch_size": a.decode_batch,
            "single_process_tokens_per_s": single,
            "cluster_tokens_per_s": plain,
            "cluster_ping_pong_tokens_per_s": pp,
            "cluster_vs_single": plain / single,
            "cluster_ping_pong_vs_single": pp / single,
        });
    }
    if a.output == OutputFormat::Json {
        println!(
            "{}",
            json!({"bench": "dispatch", "nodes": a.nodes, "layer": layer_runs, "decode": decode})
        );
    }
    Ok(())
}
