//! `myriad gateway --attention-nodes` in front of two real `myriad node attention --http`
//! processes (the tiny fixture, one kernel thread each): answers through the gateway equal the
//! same requests sent to a node directly (whole and streamed), requests spread over both
//! nodes, the gateway's API key is enforced and the nodes' own key is sent upstream in its
//! place, the nodes' load reports and serve paths reach the gateway's metrics, a client that
//! goes away cancels the sequence on its node, a node that answers 503 is retried on another,
//! and with one node killed requests still succeed, with both killed they get a 503 OpenAI
//! error object.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
#[path = "common/nodes.rs"]
mod nodes;

use nodes::{Proc, Reply, eventually, metrics, sample};

const GATEWAY_KEY: &str = "gw-key";
const NODE_KEY: &str = "node-key";
const MODEL: &str = "qwen3_5_moe-tiny";

/// Writes one request (`Connection: close`) on a new connection.
fn send(url: &str, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> TcpStream {
    nodes::send_as(url, method, path, key, body, Duration::from_secs(60))
}

/// One whole exchange.
fn http(url: &str, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> Reply {
    nodes::http_as(url, method, path, key, body)
}

/// A node that is up (`/health` 200) but refuses every request with a 503, as a node whose
/// engine has stopped does. It has no load reports (`/internal/load` is a 404, as on a node
/// older than them), which the gateway tolerates.
fn refusing_node() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut first = String::new();
            let mut length = 0;
            let _ = reader.read_line(&mut first);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some((n, v)) = line.split_once(':')
                    && n.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let (status, body) = if first.starts_with("GET /health ") {
                ("200 OK", String::new())
            } else if first.starts_with("GET /internal/load ") {
                // More free KV blocks than any real node: the proxy tries it first.
                (
                    "200 OK",
                    json!({"role": "mixed", "running": 0, "waiting": 0, "kv_blocks_used": 0,
                        "kv_blocks_total": 1_000_000_000u64, "preemptions": 0})
                    .to_string(),
                )
            } else {
                (
                    "503 Service Unavailable",
                    json!({"error": {"message": "the engine has stopped", "type": "server_error",
                        "param": null, "code": "service_unavailable"}})
                    .to_string(),
                )
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// The parts of a completion that do not change from one request to the next.
fn answer(v: &Value) -> Value {
    json!({"choices": v["choices"], "usage": v["usage"], "model": v["model"]})
}

#[test]
fn the_gateway_fronts_attention_nodes() {
    let t0 = Instant::now();
    let dir = common::fixture(MODEL);
    let dir = dir.to_str().unwrap();
    let node_args = [
        "node",
        "attention",
        "--model",
        dir,
        "--http",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--api-key",
        NODE_KEY,
    ];
    let mut a = Proc::start(&node_args);
    let mut b = Proc::start(&node_args);
    let (a_url, b_url) = (a.ready(), b.ready());
    let mut gw = Proc::start(&[
        "gateway",
        "--attention-nodes",
        &format!("{a_url},{b_url}"),
        "--port",
        "0",
        "--api-key",
        GATEWAY_KEY,
        "--upstream-api-key",
        NODE_KEY,
        "--health-interval-ms",
        "200",
        // Generous, so a loaded CI machine does not take a live node out of rotation.
        "--health-timeout-ms",
        "2000",
    ]);
    let g = gw.ready();
    let key = Some(GATEWAY_KEY);

    // Health and keys: the gateway's key at the gateway, the nodes' key at the nodes.
    let health = http(&g, "GET", "/health", None, None);
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(health.json()["healthy_nodes"], 2);
    for k in [None, Some("wrong"), Some(NODE_KEY)] {
        let r = http(&g, "GET", "/v1/models", k, None);
        assert_eq!(r.status, 401, "{k:?}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    }
    assert_eq!(http(&a_url, "GET", "/v1/models", key, None).status, 401);
    let models = http(&g, "GET", "/v1/models", key, None);
    assert_eq!(models.status, 200, "{}", models.body);
    assert_eq!(models.json()["data"][0]["id"], MODEL);
    let unknown = http(&g, "GET", "/nowhere", key, None);
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "unknown_url");

    // Whole answers: through the gateway (to either node) exactly what a node gives directly.
    let completion = json!({
        "model": MODEL, "prompt": "The quick brown fox", "max_tokens": 12,
        "temperature": 0, "ignore_eos": true, "logprobs": 2,
    });
    let direct = http(
        &a_url,
        "POST",
        "/v1/completions",
        Some(NODE_KEY),
        Some(&completion),
    );
    assert_eq!(direct.status, 200, "{}", direct.body);
    let expected = answer(&direct.json());
    assert_eq!(expected["usage"]["completion_tokens"], 12);
    for _ in 0..4 {
        let r = http(&g, "POST", "/v1/completions", key, Some(&completion));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(answer(&r.json()), expected);
        // The node says how it served the request; the gateway passes that on.
        assert_eq!(r.header("x-myriad-path"), Some("direct"), "{:?}", r.headers);
    }
    // The nodes' load reports, which the gateway polls: no key needed, mixed by default.
    let load = http(&a_url, "GET", "/internal/load", None, None);
    assert_eq!(load.status, 200, "{}", load.body);
    assert_eq!(load.json()["role"], "mixed", "{}", load.body);
    assert!(
        load.json()["kv_blocks_total"].as_u64().unwrap() > 0,
        "{}",
        load.body
    );
    let chat = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 10, "temperature": 0,
    });
    let direct_chat = http(
        &b_url,
        "POST",
        "/v1/chat/completions",
        Some(NODE_KEY),
        Some(&chat),
    );
    assert_eq!(direct_chat.status, 200, "{}", direct_chat.body);
    for _ in 0..2 {
        let r = http(&g, "POST", "/v1/chat/completions", key, Some(&chat));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(answer(&r.json()), answer(&direct_chat.json()));
    }

    // Streams: the same events, chunk for chunk.
    let mut streamed = completion.clone();
    streamed["stream"] = json!(true);
    let chunks = |r: &Reply| -> Vec<Value> {
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("text/event-stream")),
            "{:?}",
            r.headers
        );
        let events = r.events();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"].clone())
            .collect()
    };
    let direct = chunks(&http(
        &b_url,
        "POST",
        "/v1/completions",
        Some(NODE_KEY),
        Some(&streamed),
    ));
    assert!(direct.len() > 2, "{direct:?}");
    let text: String = direct
        .iter()
        .filter_map(|c| c[0]["text"].as_str())
        .collect();
    assert_eq!(text, expected["choices"][0]["text"].as_str().unwrap());
    for _ in 0..2 {
        let through = chunks(&http(&g, "POST", "/v1/completions", key, Some(&streamed)));
        assert_eq!(through, direct);
    }

    // Both nodes served: the gateway's counts per node, and the nodes' own.
    let m = metrics(&g);
    common::promtool_accepts(&m);
    for node in [&a_url, &b_url] {
        let n = sample(
            &m,
            &format!("myriad_proxy_upstream_requests_total{{node=\"{node}\",status=\"200\"}}"),
        );
        assert!(
            n >= 3.0,
            "{node} served {n} requests through the gateway:\n{m}"
        );
    }
    assert!(
        sample(&m, "myriad_gateway_direct_requests_total") >= 8.0,
        "every generation request was served directly:\n{m}"
    );
    assert_eq!(
        sample(&m, "myriad_gateway_disaggregated_requests_total"),
        0.0
    );
    for node in [&a_url, &b_url] {
        let free = format!("myriad_gateway_node_kv_blocks_free{{node=\"{node}\"}}");
        assert!(sample(&m, &free) > 0.0, "{free} in\n{m}");
    }
    let b_served = sample(
        &metrics(&b_url),
        "myriad_gateway_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
    );
    assert!(b_served >= 2.0, "node b counts {b_served} completions");

    // A client that goes away mid-stream: its node cancels the sequence, the in-flight count
    // drops.
    let mut long = streamed.clone();
    long["max_tokens"] = json!(4000);
    let mut s = send(&g, "POST", "/v1/completions", key, Some(&long));
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(s);
    let cancelled = |url: &str| sample(&metrics(url), "myriad_engine_cancelled_total");
    eventually(Duration::from_secs(10), "a cancelled sequence", || {
        cancelled(&a_url) + cancelled(&b_url) >= 1.0
    });
    // The same while a whole (non-streamed) answer is awaited: no response head yet.
    long["stream"] = json!(false);
    let s = send(&g, "POST", "/v1/completions", key, Some(&long));
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    eventually(
        Duration::from_secs(10),
        "a second cancelled sequence",
        || cancelled(&a_url) + cancelled(&b_url) >= 2.0,
    );
    eventually(Duration::from_secs(5), "no requests in flight", || {
        let m = metrics(&g);
        [&a_url, &b_url].iter().all(|n| {
            sample(
                &m,
                &format!("myriad_proxy_upstream_in_flight{{node=\"{n}\"}}"),
            ) == 0.0
        })
    });

    // A node that answers 503 is retried on another before the client sees anything.
    let refusing = refusing_node();
    let mut gw2 = Proc::start(&[
        "gateway",
        "--attention-nodes",
        &format!("{refusing},{b_url}"),
        "--port",
        "0",
        "--upstream-api-key",
        NODE_KEY,
    ]);
    let g2 = gw2.ready();
    // Once the proxy has both nodes' load reports, the refusing one (most free blocks) is
    // always tried first.
    eventually(Duration::from_secs(10), "both load reports", || {
        let m = metrics(&g2);
        [&refusing, &b_url].iter().all(|n| {
            m.contains(&format!(
                "myriad_gateway_node_kv_blocks_free{{node=\"{n}\"}}"
            ))
        })
    });
    for _ in 0..2 {
        let r = http(&g2, "POST", "/v1/completions", None, Some(&completion));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(answer(&r.json()), expected);
    }
    let m2 = metrics(&g2);
    // Both went to the refusing node first and were retried on the other.
    assert!(sample(&m2, "myriad_proxy_retries_total") >= 2.0, "{m2}");
    let refused = sample(
        &m2,
        &format!("myriad_proxy_upstream_requests_total{{node=\"{refusing}\",status=\"503\"}}"),
    );
    assert!(refused >= 1.0, "{m2}");

    // One node killed: every request still succeeds, on the other; /health stays 200.
    a.kill();
    for _ in 0..4 {
        let r = http(&g, "POST", "/v1/completions", key, Some(&completion));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(answer(&r.json()), expected);
    }
    let through = chunks(&http(&g, "POST", "/v1/completions", key, Some(&streamed)));
    assert_eq!(through, direct);
    eventually(Duration::from_secs(5), "node a out of rotation", || {
        let h = http(&g, "GET", "/health", None, None);
        assert_eq!(h.status, 200, "{}", h.body);
        h.json()["healthy_nodes"] == 1
    });
    let m = metrics(&g);
    assert_eq!(
        sample(&m, &format!("myriad_proxy_node_up{{node=\"{a_url}\"}}")),
        0.0
    );
    assert_eq!(
        sample(&m, &format!("myriad_proxy_node_up{{node=\"{b_url}\"}}")),
        1.0
    );

    // Both killed: a 503 with an OpenAI error object, and /health says 503 too.
    b.kill();
    for _ in 0..2 {
        let r = http(&g, "POST", "/v1/completions", key, Some(&completion));
        assert_eq!(r.status, 503, "{}", r.body);
        let e = &r.json()["error"];
        assert_eq!(e["type"], "server_error", "{e}");
        assert_eq!(e["code"], "service_unavailable", "{e}");
        assert!(
            e["message"].as_str().unwrap().contains("attention node"),
            "{e}"
        );
    }
    eventually(Duration::from_secs(5), "no node in rotation", || {
        http(&g, "GET", "/health", None, None).status == 503
    });
    let h = http(&g, "GET", "/health", None, None).json();
    assert_eq!(
        (h["healthy_nodes"].clone(), h["nodes"].clone()),
        (json!(0), json!(2))
    );
    eprintln!("the gateway test took {:.1}s", t0.elapsed().as_secs_f64());
}
