//! The gateway's Prometheus metrics and `GET /metrics` (text format 0.0.4, written by
//! `myriad-metrics`, the writer every role shares): requests by endpoint and status,
//! tokens in and out, time to first token, inter-token latency and request latency as
//! histograms, requests in flight, and the engine's own counters from `Generate::stats()`.
//!
//! The request counter is a middleware around every route (in `app.rs`), so refusals that
//! happen before a handler runs (401 from auth, 404 for unknown paths) are counted too.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

pub use myriad_metrics::CONTENT_TYPE;
use myriad_metrics::{Histogram, MetricsText};

/// Paths reported by name; anything else is "other", so that scanners probing random URLs
/// cannot grow the number of series without bound.
const ENDPOINTS: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/v1/models/{model}",
];

/// Seconds; from sub-millisecond (a warm decode step) to minutes (a 1M-token prefill).
const LATENCY_BUCKETS: [f64; 20] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 60.0, 300.0,
];

/// Everything the gateway counts.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    in_flight: AtomicI64,
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
    latency: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let latency = || Mutex::new(Histogram::new(&LATENCY_BUCKETS));
        Metrics {
            requests: Mutex::default(),
            prompt_tokens: AtomicU64::default(),
            generated_tokens: AtomicU64::default(),
            in_flight: AtomicI64::default(),
            ttft: latency(),
            itl: latency(),
            latency: latency(),
        }
    }
}

fn observe(h: &Mutex<Histogram>, d: Duration) {
    // A poisoned lock only means another thread panicked mid-update; the counts stay usable.
    h.lock()
        .unwrap_or_else(|p| p.into_inner())
        .observe(d.as_secs_f64());
}

impl Metrics {
    pub(crate) fn count_request(&self, endpoint: &'static str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((endpoint, status)).or_default() += 1;
    }

    pub(crate) fn prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn generated_tokens(&self, n: usize) {
        self.generated_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Requests whose sequences are in the engine now (streams not yet finished included).
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn time_to_first_token(&self, d: Duration) {
        observe(&self.ttft, d);
    }

    pub(crate) fn inter_token_latency(&self, d: Duration) {
        observe(&self.itl, d);
    }

    pub(crate) fn request_latency(&self, d: Duration) {
        observe(&self.latency, d);
    }

    /// One scrape.
    pub fn render(&self, engine: &myriad_engine_api::SchedulerStats) -> String {
        let mut m = MetricsText::new();
        requests_family(
            &mut m,
            "myriad_gateway_requests_total",
            "HTTP requests answered, by endpoint and status.",
            &self.requests,
        );
        m.counter(
            "myriad_gateway_prompt_tokens_total",
            "Prompt tokens of accepted requests.",
        )
        .sample(&[], self.prompt_tokens.load(Ordering::Relaxed) as f64);
        m.counter(
            "myriad_gateway_generation_tokens_total",
            "Tokens generated for clients.",
        )
        .sample(&[], self.generated_tokens.load(Ordering::Relaxed) as f64);
        m.gauge(
            "myriad_gateway_requests_in_flight",
            "Requests with sequences in the engine.",
        )
        .sample(&[], self.in_flight() as f64);
        let histograms = [
            (
                "myriad_gateway_time_to_first_token_seconds",
                "Time from submission to a sequence's first token.",
                &self.ttft,
            ),
            (
                "myriad_gateway_inter_token_latency_seconds",
                "Time between consecutive tokens of a sequence.",
                &self.itl,
            ),
            (
                "myriad_gateway_request_latency_seconds",
                "Time from submission until every sequence of a request finished.",
                &self.latency,
            ),
        ];
        for (name, help, h) in histograms {
            let h = h.lock().unwrap_or_else(|p| p.into_inner());
            m.histogram(name, help, &[], &h);
        }
        let gauges = [
            (
                "myriad_engine_requests_running",
                "Sequences the engine is running.",
                engine.running as f64,
            ),
            (
                "myriad_engine_requests_waiting",
                "Sequences waiting for admission.",
                engine.waiting as f64,
            ),
            (
                "myriad_engine_reserved_bytes",
                "Bytes of the KV blocks running sequences hold.",
                engine.reserved_bytes as f64,
            ),
            (
                "myriad_engine_memory_budget_bytes",
                "Bytes of the KV block pool.",
                engine.memory_budget_bytes as f64,
            ),
            (
                "myriad_engine_kv_blocks_used",
                "KV blocks running sequences hold.",
                engine.kv_blocks_used as f64,
            ),
            (
                "myriad_engine_kv_blocks_total",
                "KV blocks in the pool.",
                engine.kv_blocks_total as f64,
            ),
        ];
        for (name, help, v) in gauges {
            m.gauge(name, help).sample(&[], v);
        }
        let counters = [
            ("myriad_engine_steps_total", "Forward steps.", engine.steps),
            (
                "myriad_engine_preemptions_total",
                "Sequences preempted for KV blocks (recomputed later).",
                engine.preemptions,
            ),
            (
                "myriad_engine_prompt_tokens_total",
                "Prompt tokens prefilled.",
                engine.prompt_tokens,
            ),
            (
                "myriad_engine_generated_tokens_total",
                "Tokens generated.",
                engine.generated_tokens,
            ),
            (
                "myriad_engine_cancelled_total",
                "Sequences cancelled (client gone or stop string).",
                engine.cancelled,
            ),
            (
                "myriad_engine_rejected_total",
                "Requests refused at submission.",
                engine.rejected,
            ),
        ];
        for (name, help, v) in counters {
            m.counter(name, help).sample(&[], v as f64);
        }
        m.finish()
    }
}

/// A counter family of requests by (endpoint, status).
pub(crate) fn requests_family(
    m: &mut MetricsText,
    name: &str,
    help: &str,
    requests: &Mutex<BTreeMap<(&'static str, u16), u64>>,
) {
    let family = m.counter(name, help);
    for ((endpoint, status), n) in requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        family.sample(
            &[("endpoint", endpoint), ("status", &status.to_string())],
            *n as f64,
        );
    }
}

/// The label of a request path.
pub(crate) fn endpoint_label(path: &str) -> &'static str {
    if let Some(&e) = ENDPOINTS.iter().find(|&&e| e == path) {
        return e;
    }
    if path.starts_with("/v1/models/") {
        return "/v1/models/{model}";
    }
    "other"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_valid_text_format() {
        let m = Metrics::default();
        m.count_request("/v1/completions", 200);
        m.count_request("/v1/completions", 200);
        m.count_request("other", 404);
        m.prompt_tokens(7);
        m.time_to_first_token(Duration::from_millis(30));
        m.time_to_first_token(Duration::from_secs(1000));
        let text = m.render(&myriad_engine_api::SchedulerStats {
            running: 2,
            waiting: 1,
            ..Default::default()
        });
        assert!(text.contains(
            "myriad_gateway_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2\n"
        ));
        assert!(text.contains("myriad_gateway_prompt_tokens_total 7\n"));
        assert!(
            text.contains("myriad_gateway_time_to_first_token_seconds_bucket{le=\"0.04\"} 1\n")
        );
        assert!(text.contains("myriad_gateway_time_to_first_token_seconds_bucket{le=\"300\"} 1\n"));
        assert!(
            text.contains("myriad_gateway_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n")
        );
        assert!(text.contains("myriad_gateway_time_to_first_token_seconds_count 2\n"));
        assert!(text.contains("myriad_engine_requests_running 2\n"));
        // Every sample line belongs to a family declared above it.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap_or_default().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| declared.contains(*b)))
                    .unwrap_or(name);
                assert!(declared.contains(base), "{line}");
            }
        }
    }

    #[test]
    fn unknown_paths_share_one_label() {
        assert_eq!(endpoint_label("/v1/completions"), "/v1/completions");
        assert_eq!(endpoint_label("/v1/models/x"), "/v1/models/{model}");
        assert_eq!(endpoint_label("/wp-admin"), "other");
    }
}
