//! `myriad gateway --attention-nodes URL,…`: the distributed front door. An HTTP reverse proxy
//! (`myriad_gateway::proxy`) in front of attention nodes that serve the OpenAI API themselves
//! (`myriad node attention --http`): its own API keys, the least-loaded decode or mixed node per
//! request (by the load each node reports at `/internal/load`; prefill nodes take no client
//! requests), responses and SSE streams relayed as they come, retries on another node while
//! nothing has reached the client, health checks, `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use myriad_gateway::proxy::{ProxyConfig, ProxyState, check_health, serve_proxy};

use crate::cmd::serve::ApiKeyArgs;
use crate::lifecycle::shutdown_signal;

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// The attention nodes' base URLs (`myriad node attention --http`), e.g.
    /// `http://10.0.0.2:8001,http://10.0.0.3:8001`.
    #[arg(long, value_delimiter = ',', required = true, value_name = "URL,…")]
    pub attention_nodes: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[command(flatten)]
    pub keys: ApiKeyArgs,
    /// The key the attention nodes want, sent as `Authorization: Bearer KEY` (clients' own
    /// keys are never passed on).
    #[arg(long, env = "MYRIAD_UPSTREAM_API_KEY")]
    pub upstream_api_key: Option<String>,
    /// Largest request body, in MiB (larger: 413).
    #[arg(long, default_value_t = 32)]
    pub max_body_mb: usize,
    /// Time between health checks of each node (`GET /health`, and `GET /internal/load` for
    /// its role and load), in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub health_interval_ms: u64,
    /// How long one health check may take, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub health_timeout_ms: u64,
    /// Failed health checks in a row that take a node out of rotation (a request that cannot
    /// connect to it takes it out at once).
    #[arg(long, default_value_t = 2)]
    pub health_failures: u32,
    /// How long connecting to a node may take before another is tried, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub connect_timeout_ms: u64,
}

pub fn run(a: &GatewayArgs) -> Result<()> {
    let mut config = ProxyConfig::new(a.attention_nodes.clone());
    config.api_keys = a.keys.keys()?;
    config.upstream_api_key = a.upstream_api_key.clone().filter(|k| !k.is_empty());
    config.max_body_bytes = a.max_body_mb << 20;
    config.health_interval = Duration::from_millis(a.health_interval_ms.max(10));
    config.health_timeout = Duration::from_millis(a.health_timeout_ms.max(1));
    config.health_failures = a.health_failures.max(1);
    config.connect_timeout = Duration::from_millis(a.connect_timeout_ms.max(1));
    let state = Arc::new(ProxyState::new(config)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("myriad-gateway")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let addr = format!("{}:{}", a.host, a.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| format!("listening on {addr}"))?;
    let bound: SocketAddr = listener.local_addr().context("reading the bound address")?;
    // Start with the nodes' health known, so the first requests go where they can be served.
    runtime.block_on(check_health(&state));
    eprintln!(
        "gateway on http://{bound}/v1 in front of {} attention nodes ({} healthy: {}){}",
        state.node_urls().len(),
        state.healthy_nodes(),
        state.node_urls().join(", "),
        if state.config().api_keys.is_empty() {
            ", no API key required"
        } else {
            ""
        }
    );
    crate::lifecycle::announce_ready(&format!("http://{bound}"))?;
    runtime
        .block_on(serve_proxy(listener, state, shutdown_signal()))
        .context("serving HTTP")?;
    eprintln!("stopped");
    Ok(())
}
