//! The background health checks: every `health_interval`, `GET /health` and
//! `GET /internal/load` on every node at once, each within `health_timeout`. A node passes when
//! `/health` answers 2xx and its load report is readable, or is a 404 (an older node without
//! load reports, chosen by this proxy's in-flight count instead); a pass puts it (back) in
//! rotation and records its role and load. `health_failures` failed checks in a row take it
//! out (a request that cannot connect takes it out at once). A node reporting the `prefill`
//! role stays healthy but out of rotation. Changes are logged on stderr.

use std::sync::Arc;

use bytes::Bytes;
use tokio::task::{JoinHandle, JoinSet};

use super::choice::{Reported, Role};
use super::client::{self, UpstreamError};
use super::state::ProxyState;
use crate::http::{LOAD_PATH, LoadReport};

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
    let key = config.upstream_api_key.as_deref();
    let (health, load) = tokio::join!(
        client::get(&node.url, "/health", key, config.health_timeout),
        client::get(&node.url, LOAD_PATH, key, config.health_timeout),
    );
    match judge(health, load) {
        Ok(load) => {
            // Recorded before the node can come back, so a prefill node never enters
            // rotation, not even until the next round.
            let before = node.record_load(load);
            let came_back = node.check_passed();
            let role = node.role();
            if role == Role::Prefill && (came_back || before != Role::Prefill) {
                eprintln!(
                    "warning: attention node {} is a prefill node: it takes no client requests \
                     and stays out of rotation (list decode or mixed nodes with \
                     --attention-nodes; decode nodes find their prefill nodes themselves)",
                    node.label
                );
            } else if role != Role::Prefill && (came_back || before == Role::Prefill) {
                eprintln!(
                    "attention node {} is in rotation ({}{})",
                    node.label,
                    role.as_str(),
                    if load.is_some() {
                        ""
                    } else {
                        "; no load reports: chosen by in-flight requests"
                    }
                );
            }
        }
        Err(why) => {
            if node.check_failed(config.health_failures) {
                eprintln!("attention node {} is out of rotation: {why}", node.label);
            }
        }
    }
}

/// One check's verdict from the answers to `/health` and `/internal/load`: the load to record
/// (`None`: the node has no load endpoint), or why the check failed.
fn judge(
    health: Result<(u16, Bytes), UpstreamError>,
    load: Result<(u16, Bytes), UpstreamError>,
) -> Result<Option<(Role, Reported)>, String> {
    match health {
        Ok((status, _)) if (200..300).contains(&status) => {}
        Ok((status, _)) => return Err(format!("/health answered {status}")),
        Err(e) => return Err(e.to_string()),
    }
    let body = match load {
        Ok((404, _)) => return Ok(None),
        Ok((status, body)) if (200..300).contains(&status) => body,
        Ok((status, _)) => return Err(format!("{LOAD_PATH} answered {status}")),
        Err(e) => return Err(format!("{LOAD_PATH}: {e}")),
    };
    let report: LoadReport = serde_json::from_slice(&body)
        .map_err(|e| format!("{LOAD_PATH} is not a load report: {e}"))?;
    let role = Role::parse(&report.role)
        .ok_or_else(|| format!("{LOAD_PATH} reports an unknown role {:?}", report.role))?;
    Ok(Some((
        role,
        Reported {
            running: report.running,
            waiting: report.waiting,
            kv_blocks_free: report.kv_blocks_total.saturating_sub(report.kv_blocks_used),
        },
    )))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(status: u16, body: &str) -> Result<(u16, Bytes), UpstreamError> {
        Ok((status, Bytes::from(body.to_string())))
    }

    #[test]
    fn a_check_needs_health_and_a_load_report_or_a_404() {
        let report = r#"{"role":"decode","running":3,"waiting":2,"kv_blocks_used":10,
            "kv_blocks_total":64,"preemptions":1,"later_field":true}"#;
        assert_eq!(
            judge(ok(200, ""), ok(200, report)),
            Ok(Some((
                Role::Decode,
                Reported {
                    running: 3,
                    waiting: 2,
                    kv_blocks_free: 54
                }
            )))
        );
        // An older node: no load endpoint, still in rotation.
        assert_eq!(judge(ok(200, ""), ok(404, "")), Ok(None));
        let failures = [
            judge(ok(503, ""), ok(200, report)),
            judge(Err(UpstreamError::Connect("refused".into())), ok(404, "")),
            judge(ok(200, ""), ok(500, "")),
            judge(ok(200, ""), Err(UpstreamError::Timeout(Default::default()))),
            judge(ok(200, ""), ok(200, "{\"role\":\"decode\"}")),
            judge(ok(200, ""), ok(200, &report.replace("decode", "verify"))),
        ];
        for (k, f) in failures.iter().enumerate() {
            assert!(f.is_err(), "case {k}: {f:?}");
        }
        assert!(failures[5].as_ref().is_err_and(|e| e.contains("verify")));
    }
}
