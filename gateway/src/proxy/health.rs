//! The background health checks: every `health_interval`, `GET /health` on every node at once,
//! each within `health_timeout`. A 2xx puts a node (back) in rotation; `health_failures` failed
//! checks in a row take it out (a request that cannot connect takes it out at once). Changes
//! are logged on stderr.

use std::sync::Arc;

use tokio::task::{JoinHandle, JoinSet};

use super::client;
use super::state::ProxyState;

/// One round: every node checked, concurrently; returns when all have answered or timed out.
pub(crate) async fn check_all(state: &Arc<ProxyState>) {
    let mut checks = JoinSet::new();
    for i in 0..state.nodes.len() {
        let state = state.clone();
        checks.spawn(async move { check(&state, i).await });
    }
    while checks.join_next().await.is_some() {}
}

async fn check(state: &ProxyState, i: usize) {
    let node = state.nodes.get(i);
    let config = &state.config;
    let result = client::get_status(
        &node.url,
        "/health",
        config.upstream_api_key.as_deref(),
        config.health_timeout,
    )
    .await;
    let failure = match result {
        Ok(status) if (200..300).contains(&status) => None,
        Ok(status) => Some(format!("/health answered {status}")),
        Err(e) => Some(e.to_string()),
    };
    match failure {
        None => {
            if node.check_passed() {
                eprintln!("attention node {} is in rotation", node.label);
            }
        }
        Some(why) => {
            if node.check_failed(config.health_failures) {
                eprintln!("attention node {} is out of rotation: {why}", node.label);
            }
        }
    }
}

/// The checks running in the background until this is dropped.
#[derive(Debug)]
pub(crate) struct HealthChecks(JoinHandle<()>);

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the checks (on the current tokio runtime).
pub(crate) fn spawn(state: Arc<ProxyState>) -> HealthChecks {
    HealthChecks(tokio::spawn(async move {
        let mut tick = tokio::time::interval(state.config.health_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            check_all(&state).await;
        }
    }))
}
