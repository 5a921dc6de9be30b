//! The proxy as a whole: the routes ([`proxy_router`]) over the shared [`ProxyState`], and the
//! server with its health checks ([`serve_proxy`]). `/health`, `/metrics` and the
//! request-counting middleware are answered here.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;

use myriad_metrics::CONTENT_TYPE;

use super::state::ProxyState;
use super::{forward, health};
use crate::http::GatewayError;
use crate::http::auth;
use crate::http::error::ApiError;
use crate::http::metrics::endpoint_label;

/// Every `/v1/…` route, proxied (behind the proxy's API keys), `GET /health` (the number of
/// healthy nodes; 503 when none) and `GET /metrics`.
pub fn proxy_router(state: Arc<ProxyState>) -> Router {
    let v1 = Router::new()
        .route("/v1/{*rest}", any(forward::handle))
        .route_layer(from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), count_requests))
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

/// Middleware: counts every answered request by endpoint and status.
async fn count_requests(
    State(state): State<Arc<ProxyState>>,
    request: Request,
    next: Next,
) -> Response {
    let endpoint = endpoint_label(request.uri().path());
    let response = next.run(request).await;
    state
        .metrics
        .count_request(endpoint, response.status().as_u16());
    response
}

/// `GET /metrics`.
async fn metrics(State(state): State<Arc<ProxyState>>) -> Response {
    let text = state.metrics.render(&state.nodes);
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}
