//! What each role reports at `/metrics` (Prometheus text format): per-expert token counts with
//! a bounded label set (expert and node; per layer only with `--metrics-per-layer`), load per
//! expert node and its imbalance, the placement version, and the controller's rebalances and
//! failovers (read from the control plane's status key every second).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::device::Device;
use anyhow::{Context, Result};
use myriad_control::eplb::{self, NodeAssignment};
use myriad_control::records::{ControllerStatus, decode};
use myriad_expert::ExpertService;
use myriad_metrics::{MetricsText, Render, spawn_metrics};
use myriad_router::RemoteExperts;

use crate::control::AttentionControl;

/// Serves the attention node's metrics on `addr`.
pub fn serve_attention_metrics(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    name: &str,
    router: Arc<RemoteExperts>,
    control: &AttentionControl,
    per_layer: bool,
) -> Result<SocketAddr> {
    let status = Arc::new(Mutex::new(ControllerStatus::default()));
    {
        let (store, key, status) = (control.store.clone(), control.keys.status(), status.clone());
        runtime.spawn(async move {
            loop {
                if let Ok(Some(kv)) = store.get(&key).await
                    && let Ok(s) = decode::<ControllerStatus>(&kv)
                {
                    *status.lock().unwrap_or_else(|e| e.into_inner()) = s;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let name = name.to_string();
    let render: Render = Arc::new(move || {
        let s = status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        attention_text(&name, &router, &s, per_layer)
    });
    let (bound, _task) = runtime
        .block_on(spawn_metrics(addr, render))
        .with_context(|| format!("serving metrics on {addr}"))?;
    eprintln!("metrics on http://{bound}/metrics");
    Ok(bound)
}

/// One scrape of an attention node.
pub fn attention_text(
    node: &str,
    router: &RemoteExperts,
    status: &ControllerStatus,
    per_layer: bool,
) -> String {
    let mut m = MetricsText::new();
    let per_layer_counts = router.expert_tokens();
    let experts = per_layer_counts.first().map_or(0, Vec::len);
    let mut total = vec![0u64; experts];
    for layer in &per_layer_counts {
        for (t, v) in total.iter_mut().zip(layer) {
            *t += v;
        }
    }
    m.counter(
        "myriad_expert_tokens_routed",
        "Tokens this attention node routed to each expert, summed over layers.",
    );
    for (e, v) in total.iter().enumerate() {
        m.sample(&[("expert", &e.to_string()), ("node", node)], *v as f64);
    }
    if per_layer {
        m.counter(
            "myriad_expert_layer_tokens_routed",
            "Tokens this attention node routed to each expert of each layer.",
        );
        for (l, layer) in per_layer_counts.iter().enumerate() {
            for (e, v) in layer.iter().enumerate() {
                m.sample(
                    &[
                        ("layer", &l.to_string()),
                        ("expert", &e.to_string()),
                        ("node", node),
                    ],
                    *v as f64,
                );
            }
        }
    }
    let stats = router.stats();
    m.counter(
        "myriad_expert_node_pairs",
        "(token, expert) pairs this attention node sent to each expert node.",
    );
    for n in &stats.per_node {
        m.sample(&[("node", &n.name)], n.pairs as f64);
    }
    let placement = router.placement();
    let assignment: Vec<NodeAssignment> = placement
        .nodes()
        .iter()
        .map(|n| NodeAssignment {
            name: n.name.clone(),
            experts: n.experts.clone(),
        })
        .collect();
    let load: Vec<f64> = total.iter().map(|v| *v as f64).collect();
    m.gauge(
        "myriad_expert_load_imbalance",
        "Max over mean expert-node load under the current placement, for the tokens routed since start (1 = balanced).",
    )
    .sample(&[("node", node)], eplb::imbalance(&assignment, &load));
    m.gauge(
        "myriad_placement_version",
        "The placement version this node's steps use.",
    )
    .sample(&[("node", node)], router.placement_version() as f64);
    m.counter(
        "myriad_placement_switches",
        "Placement versions this node switched to.",
    )
    .sample(&[("node", node)], stats.placement_switches as f64);
    m.counter(
        "myriad_router_failovers",
        "Layer steps that re-sent some pairs to a replica or a newer placement.",
    )
    .sample(&[("node", node)], stats.failovers as f64);
    controller_families(&mut m, status);
    m.finish()
}

fn controller_families(m: &mut MetricsText, s: &ControllerStatus) {
    m.counter(
        "myriad_rebalances",
        "Placement rebalances the controller made.",
    )
    .sample(&[], s.rebalances as f64);
    m.counter(
        "myriad_rebalance_duration_seconds",
        "Time spent in rebalances (loading new copies, publishing, switching).",
    )
    .sample(&[], s.rebalance_seconds_total);
    m.gauge(
        "myriad_rebalance_last_duration_seconds",
        "Duration of the last rebalance.",
    )
    .sample(&[], s.last_rebalance_seconds);
    m.gauge(
        "myriad_rebalance_imbalance",
        "Imbalance (max/mean node load) of the reported load before and after the last rebalance.",
    )
    .sample(&[("when", "before")], s.imbalance_before)
    .sample(&[("when", "after")], s.imbalance_after);
    m.counter(
        "myriad_expert_node_failovers",
        "Times the controller moved the experts of expert nodes that left.",
    )
    .sample(&[], s.failovers as f64);
    m.counter(
        "myriad_expert_node_drains",
        "Expert nodes drained on request.",
    )
    .sample(&[], s.drains as f64);
}

/// One scrape of an expert node.
pub fn expert_text(service: &ExpertService<Device>, per_layer: bool) -> String {
    let node = service.identity().name.clone();
    let served = service.served();
    let experts = served.first().map_or(0, Vec::len);
    let mut total = vec![0u64; experts];
    for layer in &served {
        for (t, v) in total.iter_mut().zip(layer) {
            *t += v;
        }
    }
    let mut m = MetricsText::new();
    m.counter(
        "myriad_expert_tokens_served",
        "Tokens this expert node ran through each expert, summed over layers.",
    );
    for (e, v) in total.iter().enumerate().filter(|(_, v)| **v > 0) {
        m.sample(&[("expert", &e.to_string()), ("node", &node)], *v as f64);
    }
    if per_layer {
        m.counter(
            "myriad_expert_layer_tokens_served",
            "Tokens this expert node ran through each expert of each layer.",
        );
        for (l, layer) in served.iter().enumerate() {
            for (e, v) in layer.iter().enumerate().filter(|(_, v)| **v > 0) {
                m.sample(
                    &[
                        ("layer", &l.to_string()),
                        ("expert", &e.to_string()),
                        ("node", &node),
                    ],
                    *v as f64,
                );
            }
        }
    }
    m.counter(
        "myriad_expert_node_load",
        "(token, expert) pairs this expert node served.",
    )
    .sample(&[("node", &node)], total.iter().sum::<u64>() as f64);
    m.counter(
        "myriad_expert_requests",
        "Expert requests this node answered.",
    )
    .sample(&[("node", &node)], service.requests() as f64);
    m.gauge(
        "myriad_experts_held",
        "Experts this node holds (every layer).",
    )
    .sample(&[("node", &node)], service.shard().experts().len() as f64);
    m.finish()
}

/// Serves an expert node's metrics on `addr`.
pub fn serve_expert_metrics(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    service: ExpertService<Device>,
    per_layer: bool,
) -> Result<SocketAddr> {
    let render: Render = Arc::new(move || expert_text(&service, per_layer));
    let (bound, _task) = runtime
        .block_on(spawn_metrics(addr, render))
        .with_context(|| format!("serving metrics on {addr}"))?;
    eprintln!("metrics on http://{bound}/metrics");
    Ok(bound)
}
