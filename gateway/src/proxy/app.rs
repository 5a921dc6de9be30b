//! The proxy as a whole: the state its handlers share ([`ProxyState`]: configuration, node
//! table, metrics), the routes ([`proxy_router`]), and the server with its health checks
//! ([`serve_proxy`]). `/health` is answered here.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;

use super::config::{NodeUrl, ProxyConfig, ProxyError};
use super::metrics::{self, ProxyMetrics};
use super::nodes::Nodes;
use super::{forward, health};
use crate::http::GatewayError;
use crate::http::auth;
use crate::http::error::ApiError;

/// What every handler shares.
#[derive(Debug)]
pub struct ProxyState {
    pub(crate) config: ProxyConfig,
    pub(crate) nodes: Nodes,
    pub(crate) metrics: ProxyMetrics,
}

impl ProxyState {
    /// Checks the node URLs; every node starts out of rotation until a health check passes
    /// ([`check_health`] runs one round).
    pub fn new(config: ProxyConfig) -> Result<Self, ProxyError> {
        if config.nodes.is_empty() {
            return Err(ProxyError::NoNodes);
        }
        let mut urls: Vec<NodeUrl> = Vec::new();
        for u in &config.nodes {
            let url = NodeUrl::parse(u)?;
            if urls.contains(&url) {
                return Err(ProxyError::Duplicate(url.to_string()));
            }
            urls.push(url);
        }
        Ok(ProxyState {
            nodes: Nodes::new(urls),
            config,
            metrics: ProxyMetrics::default(),
        })
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// The nodes' URLs, in the order given.
    pub fn node_urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.label.clone()).collect()
    }

    /// Nodes in rotation now.
    pub fn healthy_nodes(&self) -> usize {
        self.nodes.healthy_count()
    }
}

/// Every `/v1/…` route, proxied (behind the proxy's API keys), `GET /health` (the number of
/// healthy nodes; 503 when none) and `GET /metrics`.
pub fn proxy_router(state: Arc<ProxyState>) -> Router {
    let v1 = Router::new()
        .route("/v1/{*rest}", any(forward::handle))
        .route_layer(from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics::handle))
        .merge(v1)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), metrics::count_requests))
        .with_state(state)
}

/// One round of health checks (every node, concurrently), e.g. before announcing readiness.
pub async fn check_health(state: &Arc<ProxyState>) {
    health::check_all(state).await;
}

/// Serves the proxy on `listener` with health checks in the background until `shutdown`
/// completes; then stops accepting and waits for the requests in progress (streams included).
pub async fn serve_proxy(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let _checks = health::spawn(state.clone());
    crate::http::serve(listener, proxy_router(state), shutdown).await
}

async fn require_key(
    State(state): State<Arc<ProxyState>>,
    request: Request,
    next: Next,
) -> Response {
    match auth::check(&state.config.api_keys, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// 200 while at least one node is in rotation, else 503; the body says how many are.
async fn health(State(state): State<Arc<ProxyState>>) -> Response {
    let healthy = state.nodes.healthy_count();
    let status = if healthy > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if healthy > 0 { "ok" } else { "unavailable" },
        "healthy_nodes": healthy,
        "nodes": state.nodes.len(),
    });
    (status, Json(body)).into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::route_not_found(method.as_str(), uri.path()).into_response()
}
