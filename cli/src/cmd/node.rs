//! `myriad node expert|attention`: the distributed roles as long-running processes.
//!
//! An expert node loads only its experts and serves them over QUIC until SIGINT or SIGTERM.
//! An attention node loads the dense model, connects to the expert nodes, and serves
//! generation requests given as JSON lines on stdin, one completion per line on stdout (the
//! interim interface until the gateway fronts attention nodes).

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use myriad_attention::{Request, SamplingParams};
use myriad_kernels::cpu::CpuBackend;
use myriad_model::{Checkpoint, ExpertSet, ModelConfig};
use myriad_router::Placement;
use serde::Deserialize;

use crate::cluster::{ClusterArgs, TlsArgs, io_runtime, serve_experts};
use crate::cmd::generate::completion_json;
use crate::local::{LocalEngine, load_with};
use crate::runtime::RuntimeArgs;

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Serve a shard of the routed experts of every layer.
    Expert(ExpertArgs),
    /// Run the dense model against expert nodes; requests as JSON lines on stdin.
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
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(cmd: &NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::Expert(a) => expert(a),
        NodeCmd::Attention(a) => {
            if a.cluster.placement.is_none() && a.cluster.expert_nodes.is_empty() {
                bail!(
                    "an attention node needs its expert nodes: --expert-nodes ADDR,… or --placement FILE"
                );
            }
            let engine = load_with(&a.model, &a.runtime.options(), &a.cluster, &a.tls)?;
            serve_requests(&engine, std::io::stdin().lock(), std::io::stdout().lock())
        }
    }
}

fn expert(a: &ExpertArgs) -> Result<()> {
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
    let opts = a.runtime.options();
    let backend = Arc::new(
        match opts.isa {
            Some(isa) => CpuBackend::with_isa(opts.threads, isa),
            None => CpuBackend::new(opts.threads),
        }
        .with_precision(opts.precision),
    );
    let runtime = io_runtime()?;
    let server = serve_experts(
        &runtime, backend, &config, &ckpt, &set, &name, a.listen, &tls,
    )?;
    let addr = server.local_addr();
    eprintln!(
        "expert node {name} listening on {addr}, holding experts {set} of {} layers",
        config.num_layers
    );
    // The launcher waits for this line.
    println!("ready {addr}");
    std::io::stdout()
        .flush()
        .context("writing the ready line")?;
    runtime.block_on(shutdown_signal());
    eprintln!("expert node {name} stopping");
    server.shutdown();
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
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
