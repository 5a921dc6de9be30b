//! `myriad serve`: the embedded default. The OpenAI-compatible HTTP API, the attention side
//! (continuous batching) and the routed experts, all in this process (or the experts on expert
//! nodes with `--expert-nodes`/`--placement`/`--etcd`). With no `--model` it makes and serves the
//! built-in small model. [`serve_api`] (the scheduler, the API's state and the HTTP server) is
//! shared with `myriad node attention --http`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use myriad_attention::{Generate, Scheduler, SchedulerConfig};
use myriad_gateway::{GatewayConfig, GatewayState};

use crate::cluster::{ClusterArgs, TlsArgs};
use crate::lifecycle::shutdown_signal;
use crate::local::{LocalEngine, load_with};
use crate::runtime::RuntimeArgs;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model directory (Hugging Face layout; default: the built-in small model, made on first
    /// use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// The HTTP API's flags, shared by `myriad serve` and `myriad node attention --http`.
#[derive(Args, Clone, Debug)]
pub struct ApiArgs {
    /// The model name clients use (default: the model directory's name; `myriad-builtin` for
    /// the built-in model).
    #[arg(long)]
    pub served_model_name: Option<String>,
    #[command(flatten)]
    pub keys: ApiKeyArgs,
    /// Largest request body, in MiB (larger: 413).
    #[arg(long, default_value_t = 32)]
    pub max_body_mb: usize,
    /// The KV block pool, in GiB: sequences take blocks as they grow; a request waits while
    /// its prompt's blocks do not fit, running sequences are preempted (and recomputed) when
    /// the pool runs out, and a request whose whole context could never fit gets 400.
    #[arg(long, default_value_t = 4.0)]
    pub kv_cache_gb: f64,
    /// Requests that may wait for memory; more get 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// `max_tokens` of a chat request that gives none (0: the rest of the context, as vLLM;
    /// each request reserves memory for its whole possible length).
    #[arg(long, default_value_t = 2048)]
    pub default_max_tokens: usize,
}

/// The API keys clients must present (`myriad serve`, `node attention --http`, `gateway`).
#[derive(Args, Clone, Debug)]
pub struct ApiKeyArgs {
    /// Accepted API keys (`Authorization: Bearer KEY`); none: no authentication.
    #[arg(long, env = "MYRIAD_API_KEY", value_delimiter = ',')]
    pub api_key: Vec<String>,
    /// A file of accepted API keys, one per line.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
}

impl ApiKeyArgs {
    /// The keys given, from the flag (or `MYRIAD_API_KEY`) and the file; a file without any
    /// is an error (it was meant to turn authentication on).
    pub fn keys(&self) -> Result<Vec<String>> {
        let mut keys: Vec<String> = self
            .api_key
            .iter()
            .filter(|k| !k.is_empty())
            .cloned()
            .collect();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading API keys from {}", path.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
            if keys.is_empty() {
                bail!("{} holds no API keys", path.display());
            }
        }
        Ok(keys)
    }
}

pub fn run(a: &ServeArgs) -> Result<()> {
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => crate::builtin::default_model()?,
    };
    let keys = a.api.keys.keys()?;
    let local = load_with(&dir, &a.runtime.options(), &a.cluster, &a.tls)?;
    let name = a.api.served_model_name.clone().unwrap_or_else(|| {
        if a.model.is_none() {
            "myriad-builtin".to_string()
        } else {
            dir_name(&dir)
        }
    });
    serve_api(
        local,
        &dir,
        &name,
        &a.api,
        keys,
        &format!("{}:{}", a.host, a.port),
    )
}

/// The model name a directory gives by default.
pub fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "myriad".into())
}

/// What a node serves besides the plain API, decided once its scheduler and HTTP runtime exist
/// (`myriad node attention --role …` builds a disaggregating engine over the scheduler and,
/// on prefill nodes, the internal prefill endpoint).
pub struct ApiSetup {
    /// The engine the API submits to: the scheduler itself, or an engine wrapping it.
    pub engine: Arc<dyn Generate>,
    /// `GatewayConfig::role`: `prefill`, `decode` or `mixed`.
    pub role: String,
    /// Routes served beside the API's (on the same listener).
    pub routes: Option<axum::Router>,
}

impl ApiSetup {
    /// The API over the scheduler alone, as `myriad serve` runs it.
    pub fn plain(scheduler: Arc<Scheduler>) -> Self {
        ApiSetup {
            engine: scheduler,
            role: "mixed".into(),
            routes: None,
        }
    }
}

/// Serves the OpenAI API over `local` on `addr` until SIGINT or SIGTERM: the scheduler
/// (continuous batching) on its own thread, the HTTP server on a small runtime. Prints
/// `ready http://ADDR` on stdout once it accepts connections.
pub fn serve_api(
    local: LocalEngine,
    dir: &Path,
    name: &str,
    api: &ApiArgs,
    keys: Vec<String>,
    addr: &str,
) -> Result<()> {
    serve_api_with(local, dir, name, api, keys, addr, |_, scheduler, _| {
        Ok(ApiSetup::plain(scheduler))
    })
}

/// [`serve_api`] with what `setup` makes of the scheduler: the engine the API uses, the role
/// it reports and extra routes. `setup` runs with the HTTP runtime, which outlives everything
/// it starts there.
pub fn serve_api_with(
    local: LocalEngine,
    dir: &Path,
    name: &str,
    api: &ApiArgs,
    keys: Vec<String>,
    addr: &str,
    setup: impl FnOnce(&LocalEngine, Arc<Scheduler>, &tokio::runtime::Runtime) -> Result<ApiSetup>,
) -> Result<()> {
    let scheduler = Arc::new(Scheduler::start(
        local.engine.clone(),
        SchedulerConfig {
            kv_cache_bytes: (api.kv_cache_gb * (1u64 << 30) as f64) as u64,
            max_waiting: api.max_waiting,
        },
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("myriad-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let ApiSetup {
        engine,
        role,
        routes,
    } = setup(&local, scheduler, &runtime)?;
    let mut config = GatewayConfig::new(name);
    config.api_keys = keys;
    config.max_body_bytes = api.max_body_mb << 20;
    config.default_max_tokens = (api.default_max_tokens > 0).then_some(api.default_max_tokens);
    config.role = role;
    let state = Arc::new(
        GatewayState::from_model_dir(config, dir, engine)
            .with_context(|| format!("setting up the API for {}", dir.display()))?,
    );
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .with_context(|| format!("listening on {addr}"))?;
    let bound: SocketAddr = listener.local_addr().context("reading the bound address")?;
    eprintln!(
        "serving {name} ({}), loaded in {:.1}s\nready: the OpenAI API is at http://{bound}/v1 \
         ({}; Ctrl-C stops)",
        dir.display(),
        local.load_seconds,
        if state.config().api_keys.is_empty() {
            "no API key required"
        } else {
            "API key required"
        }
    );
    let mut app = myriad_gateway::router(state);
    if let Some(routes) = routes {
        app = app.merge(routes);
    }
    crate::lifecycle::announce_ready(&format!("http://{bound}"))?;
    runtime
        .block_on(myriad_gateway::serve(listener, app, shutdown_signal()))
        .context("serving HTTP")?;
    eprintln!("stopped");
    // The tasks the setup started (hand-offs, the state receiver) go with the runtime, before
    // the engine they use.
    drop(runtime);
    drop(local);
    Ok(())
}
