//! The proxy's Prometheus metrics (text format 0.0.4; `app.rs` serves them): requests answered by
//! endpoint and status; per attention node: requests sent by the node's status (`error` when
//! no response head came back), requests in flight, health (`1` in rotation), failed health
//! checks, the running sequences and free KV blocks of its last load report; retries on
//! another node; healthy nodes; generation requests by the path that served them (direct or
//! disaggregated prefill, from the node's `x-myriad-path` header).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use myriad_engine_api::ServePath;
use myriad_metrics::MetricsText;

use super::choice::Reported;
use super::nodes::{Node, Nodes};
use crate::http::metrics::requests_family;

/// Everything the proxy counts beside the node table's own gauges.
#[derive(Debug, Default)]
pub(crate) struct ProxyMetrics {
    /// Answers to clients, by endpoint label and status.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Requests sent, by node index and the node's status (`None`: no response head).
    upstream: Mutex<BTreeMap<(usize, Option<u16>), u64>>,
    retries: AtomicU64,
    /// Generation requests served without and with disaggregated prefill.
    direct: AtomicU64,
    disaggregated: AtomicU64,
}

impl ProxyMetrics {
    pub(crate) fn count_request(&self, endpoint: &'static str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((endpoint, status)).or_default() += 1;
    }

    pub fn upstream(&self, node: usize, status: Option<u16>) {
        let mut map = self.upstream.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((node, status)).or_default() += 1;
    }

    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A generation request a node accepted, by the path it says served it.
    pub fn served(&self, path: ServePath) {
        match path {
            ServePath::Direct => &self.direct,
            ServePath::Disaggregated => &self.disaggregated,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// One scrape.
    pub fn render(&self, nodes: &Nodes) -> String {
        let mut m = MetricsText::new();
        requests_family(
            &mut m,
            "myriad_proxy_requests_total",
            "HTTP requests answered by the proxy, by endpoint and status.",
            &self.requests,
        );
        let upstream = m.counter(
            "myriad_proxy_upstream_requests_total",
            "Requests sent to attention nodes, by node and the node's status (error: no response).",
        );
        for ((node, status), n) in self
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let status = status.map_or_else(|| "error".to_string(), |s| s.to_string());
            upstream.sample(
                &[("node", &nodes.get(*node).label), ("status", &status)],
                *n as f64,
            );
        }
        let per_node: [(&str, bool, &str, NodeValue); 3] = [
            (
                "myriad_proxy_upstream_in_flight",
                false,
                "Requests on each attention node whose responses have not finished.",
                |n| n.in_flight() as u64,
            ),
            (
                "myriad_proxy_node_up",
                false,
                "1 while an attention node is in rotation (healthy, not a prefill node), else 0.",
                |n| u64::from(n.in_rotation()),
            ),
            (
                "myriad_proxy_health_check_failures_total",
                true,
                "Failed health checks of each attention node.",
                |n| n.health_check_failures.load(Ordering::Relaxed),
            ),
        ];
        for (name, counter, help, value) in per_node {
            let family = if counter {
                m.counter(name, help)
            } else {
                m.gauge(name, help)
            };
            for node in nodes.iter() {
                family.sample(&[("node", &node.label)], value(node) as f64);
            }
        }
        // Only nodes that report their load have a sample: an older node's is unknown.
        let reported: [(&str, &str, ReportedValue); 2] = [
            (
                "myriad_gateway_node_running",
                "Sequences running on each attention node, as its last load report said.",
                |r| r.running,
            ),
            (
                "myriad_gateway_node_kv_blocks_free",
                "Free KV-cache blocks on each attention node, as its last load report said.",
                |r| r.kv_blocks_free,
            ),
        ];
        for (name, help, value) in reported {
            let family = m.gauge(name, help);
            for node in nodes.iter() {
                if let Some(r) = node.reported() {
                    family.sample(&[("node", &node.label)], value(&r) as f64);
                }
            }
        }
        for (name, help, n) in [
            (
                "myriad_gateway_direct_requests_total",
                "Generation requests an attention node accepted and served directly (prefilled \
                 where they decode).",
                &self.direct,
            ),
            (
                "myriad_gateway_disaggregated_requests_total",
                "Generation requests an attention node accepted and had prefilled on a prefill \
                 node.",
                &self.disaggregated,
            ),
        ] {
            m.counter(name, help)
                .sample(&[], n.load(Ordering::Relaxed) as f64);
        }
        m.counter(
            "myriad_proxy_retries_total",
            "Requests sent to another node after one could not take them.",
        )
        .sample(&[], self.retries.load(Ordering::Relaxed) as f64);
        m.gauge("myriad_proxy_healthy_nodes", "Attention nodes in rotation.")
            .sample(&[], nodes.healthy_count() as f64);
        m.finish()
    }
}

/// One per-node sample's value.
type NodeValue = fn(&Node) -> u64;
/// One value of a node's last load report.
type ReportedValue = fn(&Reported) -> u64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::NodeUrl;
    use crate::proxy::choice::Role;

    #[test]
    fn renders_every_node() {
        let urls = ["http://a:1", "http://b:2"]
            .iter()
            .filter_map(|u| NodeUrl::parse(u).ok())
            .collect();
        let nodes = Nodes::new(urls);
        nodes.get(1).check_passed();
        nodes.get(1).record_load(Some((
            Role::Decode,
            Reported {
                running: 4,
                waiting: 1,
                kv_blocks_free: 60,
            },
        )));
        let _busy = nodes.get(1).start();
        let m = ProxyMetrics::default();
        m.count_request("/v1/completions", 200);
        m.upstream(1, Some(200));
        m.upstream(0, None);
        m.retry();
        m.served(ServePath::Disaggregated);
        m.served(ServePath::Disaggregated);
        m.served(ServePath::Direct);
        let text = m.render(&nodes);
        for line in [
            "myriad_proxy_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1\n",
            "myriad_proxy_upstream_requests_total{node=\"http://a:1\",status=\"error\"} 1\n",
            "myriad_proxy_upstream_requests_total{node=\"http://b:2\",status=\"200\"} 1\n",
            "myriad_proxy_upstream_in_flight{node=\"http://b:2\"} 1\n",
            "myriad_proxy_node_up{node=\"http://a:1\"} 0\n",
            "myriad_proxy_node_up{node=\"http://b:2\"} 1\n",
            "myriad_proxy_retries_total 1\n",
            "myriad_proxy_healthy_nodes 1\n",
            "myriad_gateway_node_running{node=\"http://b:2\"} 4\n",
            "myriad_gateway_node_kv_blocks_free{node=\"http://b:2\"} 60\n",
            "myriad_gateway_direct_requests_total 1\n",
            "myriad_gateway_disaggregated_requests_total 2\n",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // Node a has never reported: no load samples rather than made-up zeros.
        assert!(
            !text.contains("node_running{node=\"http://a:1\"}"),
            "{text}"
        );
    }
}
