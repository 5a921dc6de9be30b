//! Prometheus text exposition (format 0.0.4) and the `/metrics` HTTP endpoint, one writer for
//! every role (gateway, proxy, attention and expert nodes, controller).
//!
//! [`MetricsText`] builds one scrape's worth of text: families (`# HELP`, `# TYPE`, then
//! samples) kept grouped even when samples arrive interleaved, label values and help text
//! escaped, numbers written the way Prometheus parses them; [`Histogram`] keeps the buckets of
//! a latency histogram. [`serve_metrics`] answers `GET /metrics` with whatever a render
//! callback produces, so each component owns what it reports and this crate owns only the
//! format.
//!
//! Metric and label names are chosen in code, not taken from input, so a bad name is a bug:
//! it trips a `debug_assert!` in tests and debug builds, and in release the offending family or
//! sample is left out rather than corrupting the whole scrape.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

mod histogram;

pub use histogram::Histogram;

/// The content type of text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Produces the body of one scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

struct Family {
    name: String,
    help: String,
    kind: MetricKind,
    samples: String,
    /// Rendered label sets already used, since a repeated series is a scrape error.
    series: HashSet<String>,
}

/// One scrape of text format 0.0.4, built family by family.
///
/// ```
/// # use myriad_metrics::MetricsText;
/// let mut m = MetricsText::new();
/// m.counter("myriad_requests", "Requests served.")
///     .sample(&[("node", "e0")], 12.0);
/// m.gauge("myriad_experts_held", "Experts this node holds.")
///     .sample(&[], 128.0);
/// let text = m.finish();
/// assert!(text.contains("myriad_requests_total{node=\"e0\"} 12\n"));
/// ```
#[derive(Default)]
pub struct MetricsText {
    families: Vec<Family>,
    /// The family `sample` appends to; `None` before the first family or after a rejected one.
    current: Option<usize>,
}

impl MetricsText {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts (or resumes) a counter family. `_total` is appended to the name unless it is
    /// there already, as Prometheus naming conventions (and `promtool`'s linter) require.
    pub fn counter(&mut self, name: &str, help: &str) -> &mut Self {
        let name = if name.ends_with("_total") {
            name.to_string()
        } else {
            format!("{name}_total")
        };
        self.family(name, help, MetricKind::Counter)
    }

    /// Starts (or resumes) a gauge family.
    pub fn gauge(&mut self, name: &str, help: &str) -> &mut Self {
        self.family(name.to_string(), help, MetricKind::Gauge)
    }

    fn family(&mut self, name: String, help: &str, kind: MetricKind) -> &mut Self {
        self.current = None;
        if !valid_metric_name(&name) {
            debug_assert!(false, "invalid metric name {name:?}");
            return self;
        }
        // Resuming a family keeps its samples together: the format forbids a second
        // HELP/TYPE block for one name.
        if let Some(i) = self.families.iter().position(|f| f.name == name) {
            if self.families[i].kind == kind {
                self.current = Some(i);
            } else {
                debug_assert!(false, "metric {name} reused with another type");
            }
            return self;
        }
        self.families.push(Family {
            name,
            help: help.to_string(),
            kind,
            samples: String::new(),
            series: HashSet::new(),
        });
        self.current = Some(self.families.len() - 1);
        self
    }

    /// Adds a sample with `labels` (name, value) to the current family.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let Some(i) = self.current else {
            debug_assert!(false, "sample without a (valid) family");
            return self;
        };
        let family = &mut self.families[i];
        if family.kind == MetricKind::Histogram {
            debug_assert!(
                false,
                "{} is a histogram: use MetricsText::histogram",
                family.name
            );
            return self;
        }
        if family.kind == MetricKind::Counter && value < 0.0 {
            debug_assert!(false, "counter {} given {value}", family.name);
            return self;
        }
        let Some(set) = label_set(&family.name, labels, None) else {
            return self;
        };
        if !family.series.insert(set.clone()) {
            debug_assert!(false, "series {}{set} given twice", family.name);
            return self;
        }
        family.samples.push_str(&family.name);
        family.samples.push_str(&set);
        family.samples.push(' ');
        family.samples.push_str(&format_value(value));
        family.samples.push('\n');
        self
    }

    /// A histogram family (`name` ends in its unit, e.g. `_seconds`) with one series, `labels`
    /// (`le` is added per bucket): cumulative `_bucket` counts, `_sum` and `_count`. Calling it
    /// again with the same name and other labels adds a series to the same family.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        h: &Histogram,
    ) -> &mut Self {
        self.family(name.to_string(), help, MetricKind::Histogram);
        let Some(i) = self.current.take() else {
            return self;
        };
        let family = &mut self.families[i];
        let Some(key) = label_set(&family.name, labels, None) else {
            return self;
        };
        if !family.series.insert(key) {
            debug_assert!(false, "histogram series of {} given twice", family.name);
            return self;
        }
        let mut cumulative = 0;
        let buckets = h
            .bounds()
            .iter()
            .map(|&le| format_value(le))
            .chain(std::iter::once("+Inf".to_string()));
        for (le, count) in buckets.zip(h.bucket_counts()) {
            cumulative += count;
            if let Some(set) = label_set(&family.name, labels, Some(&le)) {
                let _ = writeln!(family.samples, "{}_bucket{set} {cumulative}", family.name);
            }
        }
        let set = label_set(&family.name, labels, None).unwrap_or_default();
        let _ = writeln!(
            family.samples,
            "{}_sum{set} {}",
            family.name,
            format_value(h.sum())
        );
        let _ = writeln!(family.samples, "{}_count{set} {}", family.name, h.count());
        self
    }

    /// The exposition text, families in the order they were first started.
    pub fn finish(self) -> String {
        let mut out = String::new();
        for f in &self.families {
            out.push_str("# HELP ");
            out.push_str(&f.name);
            out.push(' ');
            escape_help(&mut out, &f.help);
            out.push('\n');
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.as_str());
            out.push_str(&f.samples);
        }
        out
    }
}

/// `{a="x",b="y"}` (with `le` last when given), or "" for no labels; `None` (and a debug
/// assertion) for an invalid or repeated label name.
fn label_set(family: &str, labels: &[(&str, &str)], le: Option<&str>) -> Option<String> {
    let mut set = String::new();
    let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
    for (k, (name, value)) in all.enumerate() {
        if !valid_label_name(name)
            || labels[..k.min(labels.len())]
                .iter()
                .any(|(n, _)| *n == name)
        {
            debug_assert!(false, "invalid or repeated label {name:?} on {family}");
            return None;
        }
        set.push(if k == 0 { '{' } else { ',' });
        set.push_str(name);
        set.push_str("=\"");
        escape_label_value(&mut set, value);
        set.push('"');
    }
    if !set.is_empty() {
        set.push('}');
    }
    Some(set)
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `__`-prefixed label names are reserved for Prometheus itself.
fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text escapes backslash and newline only; quotes are literal there.
fn escape_help(out: &mut String, help: &str) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Integral values print as integers (counters read `12`, not `12.0` or `1.2e1`); other values
/// use the shortest round-tripping decimal, switching to exponent form where plain decimal
/// would run to dozens of digits. Go's `ParseFloat`, which Prometheus uses, reads all of these.
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        // -0.0 becomes 0, which is what a scrape should show.
        format!("{}", v as i64)
    } else if v == 0.0 || (1e-4..1e15).contains(&v.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

/// Serves `GET /metrics` on `listener` until the listener fails; every other request is a 404.
/// `render` runs once per scrape.
pub async fn serve_metrics(listener: TcpListener, render: Render) -> std::io::Result<()> {
    let metrics = get(move || {
        let render = Arc::clone(&render);
        async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], render()) }
    })
    .fallback(not_found);
    let app = Router::new().route("/metrics", metrics).fallback(not_found);
    axum::serve(listener, app).await
}

/// Binds `addr` (port 0 picks a free one) and serves [`serve_metrics`] on a task; returns the
/// bound address and the task, which ends only on a listener error or when aborted.
pub async fn spawn_metrics(
    addr: SocketAddr,
    render: Render,
) -> std::io::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((bound, tokio::spawn(serve_metrics(listener, render))))
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "not found\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn representative() -> String {
        let mut m = MetricsText::new();
        m.counter("myriad_tokens_routed", "Tokens routed to each expert.")
            .sample(&[("layer", "0"), ("expert", "3")], 1234.0)
            .sample(&[("layer", "0"), ("expert", "4")], 0.0);
        m.gauge("myriad_placement_imbalance", "Max over mean node load.")
            .sample(&[], 1.0625);
        m.gauge(
            "myriad_node_memory_bytes",
            "Expert memory per node; \"weird\" \\ help\nsecond line.",
        )
        .sample(&[("node", "e\"0\\\n")], 8.0 * 1024.0 * 1024.0 * 1024.0)
        .sample(&[("node", "e1")], f64::NAN)
        .sample(&[("node", "e2")], f64::INFINITY)
        .sample(&[("node", "e3")], f64::NEG_INFINITY)
        .sample(&[("node", "e4")], 1.5e-9)
        .sample(&[("node", "e5")], 3.0e300);
        // Interleaved: back to the first family, which must stay one block.
        m.counter("myriad_tokens_routed_total", "ignored on resume")
            .sample(&[("layer", "1"), ("expert", "3")], 7.0);
        let mut h = Histogram::new(&[0.01, 0.5, 2.0]);
        for v in [0.0078125, 0.25, 0.5, 9.0] {
            h.observe(v);
        }
        m.histogram("myriad_step_seconds", "Step time.", &[("node", "a")], &h);
        m.finish()
    }

    #[test]
    fn formats_families_samples_and_escapes() {
        let text = representative();
        let expected = concat!(
            "# HELP myriad_tokens_routed_total Tokens routed to each expert.\n",
            "# TYPE myriad_tokens_routed_total counter\n",
            "myriad_tokens_routed_total{layer=\"0\",expert=\"3\"} 1234\n",
            "myriad_tokens_routed_total{layer=\"0\",expert=\"4\"} 0\n",
            "myriad_tokens_routed_total{layer=\"1\",expert=\"3\"} 7\n",
            "# HELP myriad_placement_imbalance Max over mean node load.\n",
            "# TYPE myriad_placement_imbalance gauge\n",
            "myriad_placement_imbalance 1.0625\n",
            "# HELP myriad_node_memory_bytes Expert memory per node; \"weird\" \\\\ help\\nsecond line.\n",
            "# TYPE myriad_node_memory_bytes gauge\n",
            "myriad_node_memory_bytes{node=\"e\\\"0\\\\\\n\"} 8589934592\n",
            "myriad_node_memory_bytes{node=\"e1\"} NaN\n",
            "myriad_node_memory_bytes{node=\"e2\"} +Inf\n",
            "myriad_node_memory_bytes{node=\"e3\"} -Inf\n",
            "myriad_node_memory_bytes{node=\"e4\"} 1.5e-9\n",
            "myriad_node_memory_bytes{node=\"e5\"} 3e300\n",
            "# HELP myriad_step_seconds Step time.\n",
            "# TYPE myriad_step_seconds histogram\n",
            "myriad_step_seconds_bucket{node=\"a\",le=\"0.01\"} 1\n",
            "myriad_step_seconds_bucket{node=\"a\",le=\"0.5\"} 3\n",
            "myriad_step_seconds_bucket{node=\"a\",le=\"2\"} 3\n",
            "myriad_step_seconds_bucket{node=\"a\",le=\"+Inf\"} 4\n",
            "myriad_step_seconds_sum{node=\"a\"} 9.7578125\n",
            "myriad_step_seconds_count{node=\"a\"} 4\n",
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn values_round_trip_without_noise() {
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(-0.0), "0");
        assert_eq!(format_value(-3.0), "-3");
        assert_eq!(format_value(0.1), "0.1");
        assert_eq!(format_value(1e15), "1e15");
        assert_eq!(format_value(123456789012345.0), "123456789012345");
        assert_eq!(format_value(2.5e-5), "2.5e-5");
        for v in [0.1, 1.0 / 3.0, 6.02e23, 1e-300, -7.25, 12345.678] {
            let s = format_value(v);
            assert_eq!(s.parse::<f64>().expect("parses"), v, "{s}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_metric_name("myriad:requests_total"));
        assert!(!valid_metric_name("9lives"));
        assert!(!valid_metric_name("has-dash"));
        assert!(!valid_metric_name(""));
        assert!(valid_label_name("node"));
        assert!(!valid_label_name("__name__"));
        assert!(!valid_label_name("a:b"));
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "given twice")]
    fn a_series_twice_is_a_bug() {
        let mut m = MetricsText::new();
        m.gauge("g", "h")
            .sample(&[("a", "1")], 1.0)
            .sample(&[("a", "1")], 2.0);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "invalid metric name")]
    fn a_bad_name_is_a_bug() {
        MetricsText::new().gauge("bad name", "h");
    }

    #[test]
    fn promtool_accepts_the_output() {
        // promtool must be there (scripts/test.sh installs it): a missing one fails the test
        // rather than leaving the text unchecked.
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool runs (scripts/test.sh installs it: Debian package prometheus)");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(representative().as_bytes())
                .expect("write to promtool");
        }
        let out = child.wait_with_output().expect("promtool finishes");
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("promtool check metrics: ok");
    }

    /// Sends one hand-written HTTP/1.1 request and returns (status, headers, body).
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.expect("send");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("receive");
        let raw = String::from_utf8(raw).expect("utf-8 response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        (status, head.to_ascii_lowercase(), body.to_string())
    }

    #[tokio::test]
    async fn serves_metrics_over_tcp() {
        let render: Render = Arc::new(representative);
        let (addr, task) = spawn_metrics("127.0.0.1:0".parse().expect("addr"), render)
            .await
            .expect("bind");

        let (status, head, body) = request(addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("content-length: {}\r\n", body.len())),
            "{head}"
        );
        assert_eq!(body, representative());

        for (method, path) in [("GET", "/"), ("GET", "/metrics/x"), ("POST", "/metrics")] {
            let (status, _, _) = request(addr, method, path).await;
            assert_eq!(status, 404, "{method} {path}");
        }
        task.abort();
    }
}
