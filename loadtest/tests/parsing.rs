//! The pieces below a whole run: HTTP response framing from raw bytes on a loopback socket
//! (chunked with extensions and trailers, Content-Length, until-close, truncated or garbled
//! responses), error bodies, URLs, the SSE parser, and the report's arithmetic on hand-made
//! timestamps (TTFT, ITL, percentiles, the prefill window).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use myriad_loadtest::client::{RequestRecord, TokenChunk};
use myriad_loadtest::http::{self, BaseUrl, error_message};
use myriad_loadtest::report::{Phases, Report};
use myriad_loadtest::sse::SseParser;
use myriad_loadtest::stats::Distribution;
use myriad_loadtest::{Config, Error, LongPrompt};

/// Answers one request on a fresh loopback port with `raw` (whatever bytes, well-formed or
/// not), then closes the connection; the URL to send to.
async fn serve_once(raw: &'static [u8]) -> BaseUrl {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        // Read the request head, so the answer does not race the request.
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = socket.write_all(raw).await;
        let _ = socket.shutdown().await;
    });
    BaseUrl::parse(&format!("http://{addr}")).unwrap()
}

async fn body_of(raw: &'static [u8]) -> Result<(u16, Vec<u8>), Error> {
    let base = serve_once(raw).await;
    let mut resp = http::send(&base, "GET", "/", None, None).await?;
    let body = resp.read_to_end(1 << 20).await?;
    Ok((resp.status, body))
}

#[tokio::test]
async fn chunked_bodies_with_extensions_and_trailers() {
    let raw = b"HTTP/1.1 100 Continue\r\n\r\n\
        HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nX-A: 1\r\n\r\n\
        5;name=value\r\nhello\r\nA\r\n, world!!!\r\n1\r\n\n\r\n0\r\nX-Trailer: t\r\n\r\n";
    let (status, body) = body_of(raw).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, b"hello, world!!!\n");
}

#[tokio::test]
async fn content_length_and_until_close_bodies() {
    let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA";
    assert_eq!(body_of(raw).await.unwrap().1, b"hello");
    let raw = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end";
    assert_eq!(body_of(raw).await.unwrap().1, b"until the end");
    let raw = b"HTTP/1.1 204 No Content\r\n\r\n";
    assert_eq!(body_of(raw).await.unwrap().1, b"");
}

#[tokio::test]
async fn broken_framing_is_an_error_not_a_hang() {
    for (raw, want) in [
        (
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"[..],
            "broke off",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nA\r\nshort",
            "broke off",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "broke off",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
            "broke off",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
            "broke off",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "not HTTP/1.1",
        ),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not HTTP/1.1"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n", "without a full response"),
        (b"", "without a full response"),
    ] {
        let e = body_of(raw).await.unwrap_err();
        assert!(matches!(e, Error::Protocol { .. }), "{e}");
        assert!(e.to_string().contains(want), "{e} (want {want:?})");
        assert!(e.to_string().starts_with("GET http://127.0.0.1:"), "{e}");
    }
}

#[tokio::test]
async fn error_statuses_carry_the_servers_message_and_retry_after() {
    let raw = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: 70\r\n\r\n\
        {\"error\":{\"message\":\"Too many requests waiting.\",\"type\":\"rate_limit\"}}";
    let base = serve_once(raw).await;
    let resp = http::send(&base, "POST", "/v1/completions", None, Some(b"{}"))
        .await
        .unwrap();
    assert_eq!(resp.retry_after(), Some(Duration::from_secs(2)));
    let e = resp.error_for_status().await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "POST {}: HTTP 429: Too many requests waiting.",
            base.url("/v1/completions")
        )
    );
    assert_eq!(e.kind(), "HTTP 429");
    assert_eq!(error_message(b"{\"detail\": \"Not Found\"}"), "Not Found");
    assert_eq!(error_message(b"  plain text\n"), "plain text");
    assert_eq!(error_message(b""), "(empty body)");
}

#[test]
fn base_urls() {
    let u = BaseUrl::parse("http://127.0.0.1:8000").unwrap();
    assert_eq!(u.url("/v1/models"), "http://127.0.0.1:8000/v1/models");
    let u = BaseUrl::parse("http://localhost:9/v1/").unwrap();
    assert_eq!(u.url("/v1/models"), "http://localhost:9/v1/models");
    let u = BaseUrl::parse("http://h/api").unwrap();
    assert_eq!(u.url("/v1/models"), "http://h:80/api/v1/models");
    let u = BaseUrl::parse("http://[::1]:8000").unwrap();
    assert_eq!(u.authority(), "[::1]:8000");
    for bad in [
        "127.0.0.1:8000",
        "https://h",
        "http://",
        "http://h:x",
        "http://h:1?q",
    ] {
        assert!(BaseUrl::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn sse_events_split_anywhere() {
    let stream = "data: {\"a\":1}\r\n\r\n: keep-alive\n\nevent: x\ndata: line1\ndata:line2\n\n\
                  data: é\n\nid: 3\n\ndata: [DONE]\n\n";
    for piece in [1, 2, 3, 7, stream.len()] {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for bytes in stream.as_bytes().chunks(piece) {
            p.push(bytes, &mut out).unwrap();
        }
        assert_eq!(
            out,
            ["{\"a\":1}", "line1\nline2", "é", "[DONE]"],
            "pieces of {piece}"
        );
    }
}

#[test]
fn percentiles_are_nearest_rank() {
    let v: Vec<f64> = (1..=100).map(f64::from).collect();
    let d = Distribution::of(&v);
    assert_eq!(
        (d.p50, d.p90, d.p99, d.max, d.min),
        (Some(50.0), Some(90.0), Some(99.0), Some(100.0), Some(1.0))
    );
    assert_eq!(d.mean, Some(50.5));
    let d = Distribution::of(&[3.0, 1.0, 2.0]);
    assert_eq!((d.p50, d.p99), (Some(2.0), Some(3.0)));
    assert_eq!(Distribution::of(&[]).p50, None);
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// A completed request sent at `start` whose chunks (one token each) arrived at `at`.
fn record(index: usize, start: u64, at: &[u64]) -> RequestRecord {
    RequestRecord {
        index,
        start: ms(start),
        first_token: Some(ms(at[0])),
        chunks: at
            .iter()
            .map(|&t| TokenChunk {
                at: ms(t),
                tokens: 1,
            })
            .collect(),
        end: ms(*at.last().unwrap()),
        output_tokens: at.len() as u64,
        ..RequestRecord::default()
    }
}

#[test]
fn the_report_computes_ttft_itl_throughput_and_the_window_exactly() {
    let mut config = Config::new("http://h:1");
    config.concurrency = 2;
    config.requests = 3;
    config.max_tokens = 4;
    config.long_prompt = Some(LongPrompt {
        tokens: 100,
        after: ms(0),
    });
    // Stream 0: TTFT 100, ITLs 10, 10, 200 (the last one spans the window 300..450).
    // Stream 1: TTFT 50, ITLs 20, 30, 40, all before the window.
    // Stream 2: failed: excluded from latencies and tokens.
    let failed = RequestRecord {
        index: 2,
        start: ms(10),
        end: ms(20),
        error: Some(Error::Connect {
            url: "http://h:1".into(),
            cause: "Connection refused".into(),
        }),
        ..RequestRecord::default()
    };
    let long = RequestRecord {
        start: ms(300),
        first_token: Some(ms(450)),
        end: ms(450),
        output_tokens: 1,
        prompt_tokens: Some(100),
        ..record(0, 300, &[450])
    };
    let r = Report::build(
        &config,
        "m",
        Phases {
            main: vec![
                record(0, 0, &[100, 110, 120, 320]),
                record(1, 0, &[50, 70, 100, 140]),
                failed,
            ],
            main_start: ms(0),
            main_end: ms(400),
            long: Some(long),
            long_sent: true,
            baseline: Some(record(0, 0, &[10, 20, 30, 40])),
        },
    );
    assert_eq!((r.requests.ok, r.requests.failed), (2, 1));
    assert_eq!(r.errors[0].kind, "connect");
    assert_eq!(r.output_tokens, 8);
    assert_eq!(r.wall_s, 0.4);
    assert_eq!(r.output_tokens_per_s, 20.0);
    assert_eq!(r.ttft_ms.count, 2);
    assert_eq!((r.ttft_ms.min, r.ttft_ms.max), (Some(50.0), Some(100.0)));
    let mut itl = [10.0, 10.0, 200.0, 20.0, 30.0, 40.0];
    itl.sort_by(f64::total_cmp);
    assert_eq!(r.itl_ms, Distribution::of(&itl));
    assert_eq!(r.itl_ms.p50, Some(20.0));
    // 4 tokens in 0.32 s and in 0.14 s.
    let per_stream = r.stream_tokens_per_s.mean.unwrap();
    assert!((per_stream - (4.0 / 0.32 + 4.0 / 0.14) / 2.0).abs() < 1e-9);

    let l = r.long_prompt.as_ref().unwrap();
    assert_eq!(l.ttft_ms, Some(150.0));
    assert_eq!(l.submitted_at_s, Some(0.3));
    assert_eq!(l.prompt_tokens, Some(100));
    assert_eq!(l.streams_in_window, 1);
    assert_eq!(l.itl_during_prefill_ms.count, 1);
    assert_eq!(l.itl_during_prefill_ms.p50, Some(200.0));
    assert_eq!(l.itl_outside_prefill_ms.count, 5);
    assert_eq!(l.itl_outside_prefill_ms.max, Some(40.0));

    let b = r.baseline.as_ref().unwrap();
    assert_eq!(b.tokens_per_s, Some(100.0));
    assert_eq!(b.ttft_ms, Some(10.0));
    assert_eq!(b.aggregate_over_single, Some(0.2));
    assert!(!r.timed_out);

    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["long_prompt"]["itl_during_prefill_ms"]["p50"], 200.0);
    assert_eq!(json["errors"][0]["count"], 1);
}
