//! What every handler shares: the API's configuration ([`GatewayConfig`]) and state
//! ([`GatewayState`]: tokenizer, chat template, the engine behind [`Generate`], metrics), and
//! the one way handlers run CPU-heavy preparation ([`blocking`]). Handlers depend on this
//! module; it depends only on the leaf modules (errors, metrics, log-probability rendering).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use myriad_engine_api::Generate;

use super::error::ApiError;
use super::logprobs::{Renderer, TokenBytes};
use super::metrics::Metrics;
use super::openai::unix_now;
use crate::{ChatTemplate, TemplateError, Tokenizer, TokenizerError};

/// What the HTTP API is configured with.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// The name clients use in `model` (and `/v1/models` lists).
    pub model_name: String,
    /// Further names accepted for the same model.
    pub aliases: Vec<String>,
    /// Accepted bearer tokens; empty: no authentication.
    pub api_keys: Vec<String>,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
    /// `max_tokens` of a chat request that names none. `None`: the rest of the context, as
    /// vLLM does; a cap keeps such requests from reserving a whole context of KV cache at
    /// admission.
    pub default_max_tokens: Option<usize>,
    /// Most choices (`n`) per request.
    pub max_n: usize,
    /// Most alternatives per position (`logprobs`, `top_logprobs`); vLLM's default is 20.
    pub max_logprobs: usize,
    /// Split `<think>…</think>` into `reasoning_content` (vLLM's `--reasoning-parser`).
    pub reasoning: bool,
    /// Parse `<tool_call>` blocks into `tool_calls` when a request offers tools.
    pub tool_calls: bool,
    /// Interval of SSE keep-alive comments while a stream waits for the engine; `None`: never.
    pub keep_alive: Option<Duration>,
    /// This node's part in prefill/decode disaggregation: `prefill`, `decode` or `mixed`
    /// (the default: a node that does both), as `GET /internal/load` reports it to the proxy,
    /// which sends clients' requests to decode and mixed nodes only.
    pub role: String,
}

impl GatewayConfig {
    pub fn new(model_name: impl Into<String>) -> Self {
        GatewayConfig {
            model_name: model_name.into(),
            aliases: Vec::new(),
            api_keys: Vec::new(),
            // A 1M-token prompt is a few megabytes of text; JSON escaping can double it.
            max_body_bytes: 32 << 20,
            default_max_tokens: None,
            max_n: 128,
            max_logprobs: 20,
            reasoning: true,
            tool_calls: true,
            keep_alive: Some(Duration::from_secs(15)),
            role: "mixed".to_string(),
        }
    }

    /// Whether `name` names the served model.
    pub fn serves(&self, name: &str) -> bool {
        name == self.model_name || self.aliases.iter().any(|a| a == name)
    }
}

/// Why the gateway could not be set up from a model directory.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("cannot serve on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// What every handler shares.
pub struct GatewayState {
    config: GatewayConfig,
    tokenizer: Tokenizer,
    /// `None` when the model has no chat template: chat requests are then refused.
    template: Option<ChatTemplate>,
    engine: Arc<dyn Generate>,
    metrics: Metrics,
    token_bytes: TokenBytes,
    created: u64,
}

impl std::fmt::Debug for GatewayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayState")
            .field("config", &self.config)
            .field("tokenizer", &self.tokenizer)
            .field("has_template", &self.template.is_some())
            .finish_non_exhaustive()
    }
}

impl GatewayState {
    pub fn new(
        config: GatewayConfig,
        tokenizer: Tokenizer,
        template: Option<ChatTemplate>,
        engine: Arc<dyn Generate>,
    ) -> Self {
        GatewayState {
            token_bytes: TokenBytes::new(&tokenizer),
            config,
            tokenizer,
            template,
            engine,
            metrics: Metrics::default(),
            created: unix_now(),
        }
    }

    /// Loads `tokenizer.json` / `tokenizer_config.json` and the chat template (if the model
    /// has one) from a Hugging Face model directory.
    pub fn from_model_dir(
        config: GatewayConfig,
        dir: &Path,
        engine: Arc<dyn Generate>,
    ) -> Result<Self, GatewayError> {
        let tokenizer = Tokenizer::from_dir(dir)?;
        let template = match ChatTemplate::from_dir(dir) {
            Ok(t) => Some(t),
            // A base model without a template still serves completions.
            Err(TemplateError::Missing { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Self::new(config, tokenizer, template, engine))
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    pub fn engine(&self) -> &dyn Generate {
        self.engine.as_ref()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Renders log-probabilities with this model's tokenizer; `as_ids`: vLLM's
    /// `return_tokens_as_token_ids`.
    pub(crate) fn renderer(&self, as_ids: bool) -> Renderer<'_> {
        Renderer {
            tokenizer: &self.tokenizer,
            bytes: &self.token_bytes,
            as_ids,
        }
    }

    /// When the state was made (the `created` of `/v1/models`), Unix seconds.
    pub(crate) fn created(&self) -> u64 {
        self.created
    }
}

/// Runs CPU-heavy request preparation (templating, tokenising long prompts) on the blocking
/// pool, so it does not stall the async workers that move other requests' tokens.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))
}
