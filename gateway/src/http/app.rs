//! The server as a whole: the routes ([`router`]) over the shared [`GatewayState`], the accept
//! loop with graceful shutdown ([`serve`]), the request-counting middleware and the small
//! endpoints (`/v1/models`, `/health`, `/metrics`, unknown paths; `/internal/load` is in
//! `load.rs`).

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{Method, Uri, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;

use super::error::ApiError;
use super::metrics::{CONTENT_TYPE, endpoint_label};
use super::openai::{ModelCard, ModelList};
use super::state::{GatewayError, GatewayState};
use super::{auth, chat, completions, load};

/// All routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
/// `GET /v1/models/{model}` (behind the API keys), `GET /health`, `GET /metrics`,
/// `GET /internal/load` (the node's load for the proxy; unauthenticated, cluster-internal).
pub fn router(state: Arc<GatewayState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/completions", post(completions::handle))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route_layer(from_fn_with_state(state.clone(), auth::require_key));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route(load::LOAD_PATH, get(load::handle))
        .merge(v1)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config().max_body_bytes))
        .layer(from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting and waits
/// for the requests in progress (streams included) to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(GatewayError::Serve)
}

/// Binds `addr` (e.g. `0.0.0.0:8000`) and serves, as [`serve`].
pub async fn bind_and_serve(
    addr: &str,
    state: Arc<GatewayState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    serve(listener, router(state), shutdown).await
}

fn card(state: &GatewayState, name: &str) -> ModelCard {
    ModelCard {
        id: name.to_string(),
        object: "model",
        created: state.created(),
        owned_by: "myriad",
        root: state.config().model_name.clone(),
        max_model_len: state.engine().max_context(),
    }
}

async fn models(State(state): State<Arc<GatewayState>>) -> Response {
    let names = std::iter::once(&state.config().model_name).chain(&state.config().aliases);
    Json(ModelList {
        object: "list",
        data: names.map(|n| card(&state, n)).collect(),
    })
    .into_response()
}

async fn model(State(state): State<Arc<GatewayState>>, UrlPath(name): UrlPath<String>) -> Response {
    if state.config().serves(&name) {
        Json(card(&state, &name)).into_response()
    } else {
        ApiError::model_not_found(&name).into_response()
    }
}

/// 200 with an empty body while the server runs, as vLLM answers (load balancers probe it).
async fn health() -> Response {
    ().into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::route_not_found(method.as_str(), uri.path()).into_response()
}

/// Middleware: counts every answered request by endpoint and status.
async fn count_requests(
    State(state): State<Arc<GatewayState>>,
    request: Request,
    next: Next,
) -> Response {
    let endpoint = endpoint_label(request.uri().path());
    let response = next.run(request).await;
    state
        .metrics()
        .count_request(endpoint, response.status().as_u16());
    response
}

/// `GET /metrics`.
async fn metrics(State(state): State<Arc<GatewayState>>) -> Response {
    let text = state.metrics().render(&state.engine().stats());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}
