//! A prefill node's `POST /internal/prefill` ([`PrefillCall`]): prefill the request here,
//! send its state to the decode node's receiver over QUIC, answer with the
//! `PrefillOutput` as JSON.
//!
//! | status | when |
//! | --- | --- |
//! | 200 | the state was sent and acknowledged; the body is the `PrefillOutput` |
//! | 400 | the body is not a `PrefillCall`, or the request is invalid or can never fit here |
//! | 401 | the node has API keys and the call presents none of them |
//! | 429 | the node's queue is full (`Retry-After`) |
//! | 500 | the prefill itself failed (its step failed) |
//! | 502 | the state could not be sent to the decode node (its message says why) |
//! | 503 | the engine has stopped |
//!
//! Error bodies are OpenAI error objects naming the problem. The handler owns the prefill's
//! ticket and spawns nothing: when the decode node drops the call (its client went away), the
//! HTTP server drops the handler, the ticket with it, and the prefill is cancelled.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use myriad_attention::{Scheduler, SubmitError};
use serde_json::json;

use super::protocol::{PREFILL_PATH, PrefillCall};
use super::sender::StateSender;

/// What the endpoint needs.
pub struct PrefillApi {
    scheduler: Arc<Scheduler>,
    sender: StateSender,
    /// The node's API keys (empty: no authentication), as its `/v1` routes take them.
    api_keys: Vec<String>,
    max_body_bytes: usize,
}

impl PrefillApi {
    pub fn new(
        scheduler: Arc<Scheduler>,
        sender: StateSender,
        api_keys: Vec<String>,
        max_body_bytes: usize,
    ) -> Arc<Self> {
        Arc::new(PrefillApi {
            scheduler,
            sender,
            api_keys,
            max_body_bytes,
        })
    }
}

/// The route, to merge into the node's API router.
pub fn routes(api: Arc<PrefillApi>) -> Router {
    let limit = api.max_body_bytes;
    Router::new()
        .route(PREFILL_PATH, post(handle))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(api)
}

/// An OpenAI-style error response.
fn error(status: StatusCode, kind: &str, message: String) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "code": status.as_u16()}});
    (status, axum::Json(body)).into_response()
}

fn authorized(api: &PrefillApi, headers: &HeaderMap) -> bool {
    if api.api_keys.is_empty() {
        return true;
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|key| api.api_keys.iter().any(|k| k == key.trim()))
}

async fn handle(State(api): State<Arc<PrefillApi>>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&api, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "this node wants an API key (Authorization: Bearer KEY); decode nodes send their \
             first --api-key"
                .into(),
        );
    }
    let call: PrefillCall = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("the body is not a prefill call: {e}"),
            );
        }
    };
    let ticket = match api.scheduler.submit_prefill(call.request) {
        Ok(t) => t,
        Err(e) => return refused(e),
    };
    // Dropping this future (the caller hung up) drops the ticket: the prefill is cancelled.
    let prefilled = match ticket.wait().await {
        Ok(p) => p,
        Err(m) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("the prefill failed: {m}"),
            );
        }
    };
    if let Err(m) = api
        .sender
        .send(
            &call.state_addr,
            call.server_name.as_deref(),
            &prefilled.image,
            call.transfer_id,
        )
        .await
    {
        return error(
            StatusCode::BAD_GATEWAY,
            "state_transfer_error",
            format!(
                "the state of transfer {} could not be sent to {}: {m}",
                call.transfer_id, call.state_addr
            ),
        );
    }
    axum::Json(prefilled.output).into_response()
}

/// The response for a request the scheduler would not take.
fn refused(e: SubmitError) -> Response {
    let message = e.to_string();
    match e {
        SubmitError::Invalid(_) | SubmitError::TooLarge(_) => {
            error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
        SubmitError::Overloaded { retry_after, .. } => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "overloaded", message);
            if let Ok(v) = retry_after.as_secs().max(1).to_string().parse() {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        SubmitError::Stopped => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message),
    }
}
