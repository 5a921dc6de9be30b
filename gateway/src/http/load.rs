//! What an attention node tells the proxy in front of it (`myriad gateway`) about itself: its
//! role and load at `GET /internal/load` ([`LoadReport`], from the engine's
//! `SchedulerStats`), and, on every generation response, which path served the request (the
//! [`PATH_HEADER`] header: `direct`, or `disaggregated` when its prompt was prefilled on a
//! prefill node). The proxy reads both with the same types, so the two sides cannot drift.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use myriad_engine_api::ServePath;
use serde::{Deserialize, Serialize};

use super::state::GatewayState;

/// Where a node answers with its [`LoadReport`].
pub const LOAD_PATH: &str = "/internal/load";

/// The response header that says how a generation request was served
/// ([`ServePath::as_str`]).
pub const PATH_HEADER: &str = "x-myriad-path";

/// A node's load as the proxy sees it (the JSON of `GET /internal/load`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// `prefill`, `decode` or `mixed` (`GatewayConfig::role`).
    pub role: String,
    /// Sequences in the running batch.
    pub running: u64,
    /// Sequences admitted to the queue but not yet running.
    pub waiting: u64,
    pub kv_blocks_used: u64,
    pub kv_blocks_total: u64,
    /// Sequences preempted since the node started.
    pub preemptions: u64,
}

/// `GET /internal/load`. Unauthenticated, like `/health` and `/metrics`: it is for the proxy
/// inside the cluster and says nothing about any request's content, and the proxy polls it
/// with the health checks whether or not the nodes want an API key.
pub(crate) async fn handle(State(state): State<Arc<GatewayState>>) -> Response {
    let stats = state.engine().stats();
    Json(LoadReport {
        role: state.config().role.clone(),
        running: stats.running as u64,
        waiting: stats.waiting as u64,
        kv_blocks_used: stats.kv_blocks_used,
        kv_blocks_total: stats.kv_blocks_total,
        preemptions: stats.preemptions,
    })
    .into_response()
}

/// `response` with the [`PATH_HEADER`] saying how it was served.
pub(crate) fn with_path(mut response: Response, path: ServePath) -> Response {
    response
        .headers_mut()
        .insert(PATH_HEADER, HeaderValue::from_static(path.as_str()));
    response
}
