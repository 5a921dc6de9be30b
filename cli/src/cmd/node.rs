//! `myriad node expert|attention`: the distributed roles as long-running processes.
//!
//! An expert node loads only its experts and serves them over QUIC until SIGINT or SIGTERM.
//! An attention node loads the dense model, connects to the expert nodes (or, given none, runs
//! every expert itself, as `myriad serve` does), and either serves the OpenAI API with
//! `--http HOST:PORT` (the same server as `myriad serve`, for `myriad gateway
//! --attention-nodes` to front) or, without it, takes generation requests as JSON lines on
//! stdin and writes one completion per line on stdout. With `--http`, `--role` and
//! `--prefill-nodes` make it a prefill or decode node of a disaggregated cluster
//! (`crate::disagg`).

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use myriad_attention::{Request, SamplingParams};
use myriad_model::{Checkpoint, ExpertSet, ModelConfig};
use myriad_router::Placement;
use serde::Deserialize;

use myriad_control::Registration;
use myriad_control::expert_agent::serve_assignments;
use myriad_control::records::ExpertNodeRecord;
use myriad_expert::ExpertShard;

use crate::cluster::{ClusterArgs, TlsArgs, io_runtime, routed_expert_bytes, serve_shard};
use crate::cmd::generate::completion_json;
use crate::cmd::serve::{ApiArgs, dir_name, serve_api_with};
use crate::control::ControlArgs;
use crate::disagg::DisaggArgs;
use crate::lifecycle::shutdown_signal;
use crate::local::{LocalEngine, load_with};
use crate::metrics::serve_expert_metrics;
use crate::runtime::RuntimeArgs;

// Parsed once at start-up and never moved around: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Serve a shard of the routed experts of every layer.
    Expert(ExpertArgs),
    /// Run the dense model against expert nodes (or all experts here, given none); serve the
    /// OpenAI API with --http, else take requests as JSON lines on stdin.
    Attention(AttentionArgs),
}

#[derive(Args, Debug)]
pub struct ExpertArgs {
    /// Model directory (Hugging Face layout); only this node's experts are read.
    #[arg(long)]
    pub model: PathBuf,
    /// UDP address to listen on (port 0: any free port; the chosen one is printed).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Experts to hold, e.g. `0-127,300` or `all` (or take them from --placement).
    #[arg(long, conflicts_with = "placement")]
    pub experts: Option<String>,
    /// A placement file naming this node (--name) and its experts.
    #[arg(long, requires = "name")]
    pub placement: Option<PathBuf>,
    /// This node's name (default: its listen address).
    #[arg(long)]
    pub name: Option<String>,
    /// Register with the control plane and hold what it assigns (see --experts for a start).
    #[command(flatten)]
    pub control: ControlArgs,
    /// With --etcd: memory this node may fill with experts, in GiB (default: what the
    /// machine has available now).
    #[arg(long)]
    pub memory_gb: Option<f64>,
    /// Serve Prometheus metrics on this address (GET /metrics).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Also report token counts per layer (a label set 1 + layers times larger).
    #[arg(long)]
    pub metrics_per_layer: bool,
    /// With --etcd: the share of one core that loading experts for a rebalance or drain may
    /// take (a failover's loads always run at full speed: steps wait for them).
    #[arg(long, default_value_t = 0.25)]
    pub load_duty: f64,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Args, Debug)]
pub struct AttentionArgs {
    /// Model directory (Hugging Face layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Serve the OpenAI API on HOST:PORT (port 0: any free port; `ready http://ADDR` is
    /// printed) instead of reading requests from stdin.
    #[arg(long, value_name = "HOST:PORT")]
    pub http: Option<String>,
    /// With --http: the API's settings, as `myriad serve` takes them.
    #[command(flatten)]
    pub api: ApiArgs,
    /// With --http: prefill/decode disaggregation (`--role`, `--prefill-nodes`, …).
    #[command(flatten)]
    pub disagg: DisaggArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Also used for state transfers between prefill and decode nodes.
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(cmd: &NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::Expert(a) => expert(a),
        NodeCmd::Attention(a) => attention(a),
    }
}

fn attention(a: &AttentionArgs) -> Result<()> {
    a.disagg.check(a.http.is_some(), &a.tls)?;
    if a.cluster.placement.is_none()
        && a.cluster.expert_nodes.is_empty()
        && !a.cluster.control.enabled()
    {
        eprintln!(
            "no expert nodes given (--expert-nodes, --placement or --etcd): every routed expert \
             runs in this process"
        );
    }
    let Some(addr) = &a.http else {
        let engine = load_with(&a.model, &a.runtime.options(), &a.cluster, &a.tls)?;
        return serve_requests(&engine, std::io::stdin().lock(), std::io::stdout().lock());
    };
    let keys = a.api.keys.keys()?;
    let local = load_with(&a.model, &a.runtime.options(), &a.cluster, &a.tls)?;
    let name = a
        .api
        .served_model_name
        .clone()
        .unwrap_or_else(|| dir_name(&a.model));
    let max_body = a.api.max_body_mb << 20;
    let node_keys = keys.clone();
    serve_api_with(
        local,
        &a.model,
        &name,
        &a.api,
        keys,
        addr,
        |local, scheduler, runtime| {
            crate::disagg::setup(
                &a.disagg, &a.tls, &node_keys, max_body, local, scheduler, runtime,
            )
        },
    )
}

fn expert(a: &ExpertArgs) -> Result<()> {
    if a.control.enabled() {
        return controlled_expert(a);
    }
    let config = ModelConfig::from_dir(&a.model)?;
    let ckpt = Checkpoint::open(&a.model, &config)
        .with_context(|| format!("opening the checkpoint in {}", a.model.display()))?;
    let (set, name) = match (&a.placement, &a.experts) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the placement {}", path.display()))?;
            let placement =
                Placement::from_json(&text, config.num_experts, &path.display().to_string())?;
            let name = a.name.clone().unwrap_or_default();
            let node = placement.node(&name).with_context(|| {
                format!("the placement {} has no node named {name}", path.display())
            })?;
            (node.experts.clone(), name)
        }
        (None, spec) => {
            let set = ExpertSet::parse(spec.as_deref().unwrap_or("all"), config.num_experts)?;
            (set, a.name.clone().unwrap_or_else(|| a.listen.to_string()))
        }
    };
    let tls = a.tls.config()?;
    let backend = crate::device::backend(&a.runtime.options());
    let runtime = io_runtime()?;
    let shard = Arc::new(
        ExpertShard::load(backend, &config, &ckpt, &set).context("loading this node's experts")?,
    );
    let (server, service) = serve_shard(&runtime, shard, &config, &name, a.listen, &tls)?;
    if let Some(m) = a.metrics_addr {
        serve_expert_metrics(&runtime, m, service, a.metrics_per_layer)?;
    }
    let addr = server.local_addr();
    eprintln!(
        "expert node {name} listening on {addr}, holding experts {set} of {} layers",
        config.num_layers
    );
    crate::lifecycle::announce_ready(&format!("{addr}"))?;
    runtime.block_on(shutdown_signal());
    eprintln!("expert node {name} stopping");
    server.shutdown();
    Ok(())
}

/// An expert node under the control plane: registers (address, memory, what it holds) under a
/// lease, then loads and drops experts as its assignment says.
fn controlled_expert(a: &ExpertArgs) -> Result<()> {
    let config = ModelConfig::from_dir(&a.model)?;
    let ckpt = Arc::new(
        Checkpoint::open(&a.model, &config)
            .with_context(|| format!("opening the checkpoint in {}", a.model.display()))?,
    );
    let set = match &a.experts {
        Some(spec) => ExpertSet::parse(spec, config.num_experts)?,
        None => ExpertSet::none(config.num_experts),
    };
    let tls = a.tls.config()?;
    let backend = crate::device::backend(&a.runtime.options());
    let runtime = io_runtime()?;
    let shard = Arc::new(
        ExpertShard::load_growable(backend, &config, ckpt.clone(), &set)
            .context("loading this node's experts")?,
    );
    let name = a.name.clone().unwrap_or_else(|| a.listen.to_string());
    let (server, service) = serve_shard(&runtime, shard.clone(), &config, &name, a.listen, &tls)?;
    let addr = server.local_addr();
    let metrics = match a.metrics_addr {
        Some(m) => Some(serve_expert_metrics(
            &runtime,
            m,
            service,
            a.metrics_per_layer,
        )?),
        None => None,
    };
    let store = a.control.store(&runtime)?;
    let keys = a.control.keys();
    let registration = Arc::new(
        runtime
            .block_on(Registration::new(store.clone(), a.control.lease_ttl()))
            .context("registering with the control plane")?,
    );
    let memory_bytes = match a.memory_gb {
        Some(gb) => (gb * (1u64 << 30) as f64) as u64,
        None => available_memory().unwrap_or(16 << 30),
    };
    let record = ExpertNodeRecord {
        name: name.clone(),
        addr: addr.to_string(),
        memory_bytes,
        expert_bytes: (routed_expert_bytes(&config, &ckpt) * config.num_layers) as u64,
        held: set.to_string(),
        model_fingerprint: config.fingerprint(),
        metrics_addr: metrics.map(|m| m.to_string()),
        applied_serial: 0,
        load_error: None,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent = runtime.spawn(serve_assignments(
        store,
        keys.clone(),
        registration.clone(),
        record,
        Arc::new(crate::adapters::PacedShard {
            shard,
            background_duty: a.load_duty,
        }),
        stopped,
    ));
    eprintln!(
        "expert node {name} listening on {addr}, registered under {} (holding {})",
        keys.root(),
        if set.is_empty() {
            "nothing yet".to_string()
        } else {
            set.to_string()
        }
    );
    crate::lifecycle::announce_ready(&format!("{addr}"))?;
    runtime.block_on(shutdown_signal());
    eprintln!("expert node {name} stopping");
    let _ = stop.send(true);
    agent.abort();
    if let Ok(r) = Arc::try_unwrap(registration) {
        let _ = runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(2), r.leave()).await
        });
    }
    server.shutdown();
    Ok(())
}

/// MemAvailable from /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One request line.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    prompt_token_ids: Vec<u32>,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
    #[serde(default)]
    temperature: f32,
    #[serde(default = "one")]
    top_p: f32,
    #[serde(default)]
    top_k: usize,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    stop_token_ids: Vec<u32>,
    #[serde(default)]
    logprobs: Option<usize>,
    #[serde(default)]
    echo: bool,
}

fn default_max_tokens() -> usize {
    16
}

fn one() -> f32 {
    1.0
}

/// Reads JSON request lines until EOF, generates them as one batch, writes one JSON completion
/// per line in request order. A malformed line is an error naming its line number.
pub fn serve_requests(
    engine: &LocalEngine,
    input: impl BufRead,
    mut output: impl Write,
) -> Result<()> {
    let mut requests = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.context("reading requests from stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let r: RequestLine =
            serde_json::from_str(&line).with_context(|| format!("request line {}", i + 1))?;
        requests.push(Request {
            prompt: r.prompt_token_ids,
            max_tokens: r.max_tokens,
            sampling: SamplingParams {
                temperature: r.temperature,
                top_p: r.top_p,
                top_k: r.top_k,
                seed: r.seed,
            },
            ignore_eos: r.ignore_eos,
            stop_token_ids: r.stop_token_ids,
            logprobs: r.logprobs,
            echo: r.echo,
        });
    }
    let out = engine.engine.generate(&requests)?;
    for c in &out {
        writeln!(output, "{}", completion_json(c, None)?).context("writing completions")?;
    }
    output.flush().context("writing completions")?;
    Ok(())
}
