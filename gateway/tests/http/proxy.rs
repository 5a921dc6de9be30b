//! The proxy (`myriad gateway`) in front of nodes: real node servers over fake engines whose
//! reported load and serve paths the tests set, and a hand-written upstream that breaks its
//! responses off, on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use myriad_engine_api::{SchedulerStats, ServePath};
use myriad_gateway::proxy::{ProxyConfig, ProxyState, check_health, proxy_router};
use myriad_gateway::serve;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::support::*;

/// A proxy whose health checks run only when the test calls `check_health`.
async fn start_proxy(nodes: &[String]) -> (SocketAddr, Arc<ProxyState>) {
    let mut config = ProxyConfig::new(nodes.to_vec());
    config.health_timeout = Duration::from_secs(5);
    let state = Arc::new(ProxyState::new(config).unwrap());
    check_health(&state).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        proxy_router(Arc::clone(&state)),
        std::future::pending(),
    ));
    (addr, state)
}

async fn node(role: &str, running: usize, kv_used: u64) -> Server {
    let mut c = config();
    c.role = role.into();
    let s = start_with(c, None).await;
    s.engine.reply("Hello", true);
    report(&s, running, kv_used);
    s
}

fn report(s: &Server, running: usize, kv_used: u64) {
    s.engine.set_stats(Some(SchedulerStats {
        running,
        kv_blocks_used: kv_used,
        kv_blocks_total: 64,
        ..Default::default()
    }));
}

fn url(s: &Server) -> String {
    format!("http://{}", s.addr)
}

/// The value of the sample `series` in a metrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn requests_go_to_the_least_loaded_decode_node_and_paths_are_counted() {
    // Free KV blocks only break ties: b has fewer but its queue is shorter.
    let a = node("decode", 4, 0).await;
    let b = node("mixed", 0, 10).await;
    let prefill = node("prefill", 0, 0).await;
    b.engine.set_path(|_| ServePath::Disaggregated);
    let (p, state) = start_proxy(&[url(&a), url(&b), url(&prefill)]).await;
    let h = get(p, "/health").await.json();
    assert_eq!(
        (h["healthy_nodes"].clone(), h["nodes"].clone()),
        (json!(2), json!(3))
    );
    assert_eq!(state.healthy_nodes(), 2);

    let completion = json!({"model": MODEL, "prompt": "Hi"});
    for _ in 0..4 {
        let r = post(p, "/v1/completions", &completion).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-myriad-path"), Some("disaggregated"));
    }
    let served = |s: &Server| s.engine.requests().len();
    assert_eq!(
        (served(&a), served(&b)),
        (0, 4),
        "b reports the lighter load"
    );

    // b gets busier than a: the next requests go to a, streamed or not.
    report(&b, 9, 30);
    check_health(&state).await;
    let mut streamed = completion.clone();
    streamed["stream"] = json!(true);
    for body in [&completion, &streamed, &completion] {
        let r = post(p, "/v1/completions", body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-myriad-path"), Some("direct"));
    }
    assert_eq!((served(&a), served(&b)), (3, 4));
    assert_eq!(
        served(&prefill),
        0,
        "a prefill node takes no client requests"
    );

    let m = get(p, "/metrics").await.text();
    let expect = [
        ("myriad_gateway_direct_requests_total".to_string(), 3.0),
        (
            "myriad_gateway_disaggregated_requests_total".to_string(),
            4.0,
        ),
        (
            format!("myriad_gateway_node_running{{node=\"{}\"}}", url(&a)),
            4.0,
        ),
        (
            format!("myriad_gateway_node_running{{node=\"{}\"}}", url(&b)),
            9.0,
        ),
        (
            format!("myriad_gateway_node_kv_blocks_free{{node=\"{}\"}}", url(&a)),
            64.0,
        ),
        (
            format!("myriad_gateway_node_kv_blocks_free{{node=\"{}\"}}", url(&b)),
            34.0,
        ),
        (
            format!("myriad_proxy_node_up{{node=\"{}\"}}", url(&prefill)),
            0.0,
        ),
        (format!("myriad_proxy_node_up{{node=\"{}\"}}", url(&a)), 1.0),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&m, &series), Some(value), "{series} in\n{m}");
    }
}

/// A hand-written node: `/health` 200, `/internal/load` answers `load_status` (404: an older
/// node), a streamed completion sends two events and, once `release` is notified, drops the
/// connection; a chat completion sends part of a JSON body and drops it.
struct FakeUpstream {
    url: String,
    release: Arc<Notify>,
}

const EVENT_1: &str = "data: {\"n\":1}\n\n";
const EVENT_2: &str = "data: {\"n\":2}\n\n";

async fn fake_upstream(load_status: u16) -> FakeUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let release = Arc::new(Notify::new());
    let notify = Arc::clone(&release);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, load_status, Arc::clone(&notify)));
        }
    });
    FakeUpstream { url, release }
}

/// A chunk of `Transfer-Encoding: chunked`.
fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

async fn answer(mut s: TcpStream, load_status: u16, release: Arc<Notify>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while raw.len() < head_end + length {
        let n = s.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let first = head.lines().next().unwrap_or_default().to_string();
    let simple = |status: u16, body: &str| {
        format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let reply = if first.starts_with("get /health ") {
        simple(200, "")
    } else if first.starts_with("get /internal/load ") {
        simple(load_status, "{}")
    } else if first.starts_with("post /v1/completions ") {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                    transfer-encoding: chunked\r\nx-myriad-path: disaggregated\r\n\r\n";
        let events = format!("{head}{}{}", chunk(EVENT_1), chunk(EVENT_2));
        let _ = s.write_all(events.as_bytes()).await;
        // The node dies once the test has seen both events reach the client.
        release.notified().await;
        return;
    } else if first.starts_with("post /v1/chat/completions ") {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                    transfer-encoding: chunked\r\n\r\n";
        format!("{head}{}", chunk("{\"partial\":"))
    } else {
        simple(404, "{}")
    };
    let _ = s.write_all(reply.as_bytes()).await;
}

/// Reads into `raw` until `needle` has arrived (or panics after 10 s).
async fn read_until(s: &mut TcpStream, raw: &mut Vec<u8>, needle: &str) {
    let mut buf = [0u8; 4096];
    let wait = async {
        while !String::from_utf8_lossy(raw).contains(needle) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended before {needle:?}");
            raw.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("{needle:?} did not arrive"));
}

#[tokio::test]
async fn a_stream_that_breaks_off_ends_with_an_error_event() {
    let up = fake_upstream(404).await;
    let (p, state) = start_proxy(std::slice::from_ref(&up.url)).await;
    assert_eq!(
        state.healthy_nodes(),
        1,
        "a node without load reports is served"
    );

    let mut s = open(
        p,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Hi", "stream": true}),
    )
    .await;
    let mut raw = Vec::new();
    // Both events reach the client before the node fails.
    read_until(&mut s, &mut raw, EVENT_2).await;
    up.release.notify_one();
    let rest = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await;
    assert!(rest.is_ok_and(|r| r.is_ok()), "the stream did not end");
    assert!(
        raw.ends_with(b"0\r\n\r\n"),
        "the response was cut, not ended"
    );
    let reply = parse_reply(&raw);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-myriad-path"), Some("disaggregated"));
    let text = reply.text();
    let prefix = format!(
        "{EVENT_1}{EVENT_2}data: {{\"error\":{{\"message\":\"the attention node {} failed \
         mid-stream: ",
        up.url
    );
    let suffix = "\",\"type\":\"server_error\",\"param\":null,\"code\":502}}\n\ndata: [DONE]\n\n";
    assert!(
        text.starts_with(&prefix) && text.ends_with(suffix),
        "{text:?}"
    );
    let events = reply.sse();
    assert_eq!(events.len(), 3, "{events:?}");

    // A body that is not an event stream is cut as the node's was: no events appended.
    let mut s = open(
        p,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("{\"partial\":"), "{text}");
    assert!(
        !text.contains("[DONE]") && !text.ends_with("0\r\n\r\n"),
        "{text}"
    );

    // One streamed completion said it was disaggregated; the chat said nothing: direct.
    let m = get(p, "/metrics").await.text();
    assert_eq!(
        sample(&m, "myriad_gateway_disaggregated_requests_total"),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "myriad_gateway_direct_requests_total"),
        Some(1.0)
    );
    // An older node reports no load: no made-up samples for it.
    assert!(!m.contains("myriad_gateway_node_running{"), "{m}");
}

#[tokio::test]
async fn a_node_whose_load_report_fails_is_out_of_rotation() {
    let broken = fake_upstream(500).await;
    let up = fake_upstream(404).await;
    let (p, state) = start_proxy(&[broken.url.clone(), up.url.clone()]).await;
    assert_eq!(state.healthy_nodes(), 1);
    let m = get(p, "/metrics").await.text();
    for (u, value) in [(&broken.url, 0.0), (&up.url, 1.0)] {
        let series = format!("myriad_proxy_node_up{{node=\"{u}\"}}");
        assert_eq!(sample(&m, &series), Some(value), "{series} in\n{m}");
    }
    let failures = format!(
        "myriad_proxy_health_check_failures_total{{node=\"{}\"}}",
        broken.url
    );
    assert_eq!(sample(&m, &failures), Some(1.0), "{m}");
}
