//! Whole runs against the fake server (`common`): latencies measured from chunk arrivals,
//! chunked and until-close bodies split anywhere, 429s recorded or retried, runs that end by
//! themselves or at their time limit, connection and HTTP errors named, and the long prompt's
//! prefill window told apart from the rest.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Behavior, start};
use myriad_loadtest::{Config, Endpoint, Error, LongPrompt, run};

fn config(url: &str, concurrency: usize, requests: usize, max_tokens: usize) -> Config {
    Config {
        prompt_len: 8,
        concurrency,
        requests,
        max_tokens,
        timeout: Duration::from_secs(30),
        ..Config::new(url)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttft_and_itl_come_from_chunk_arrivals() {
    let server = start(Behavior {
        ttft: Duration::from_millis(150),
        itl: Duration::from_millis(40),
        ..Behavior::default()
    })
    .await;
    let r = run(&config(&server.url, 2, 4, 5)).await.unwrap();
    assert_eq!(
        r.config.model, "fake-model",
        "the model comes from /v1/models"
    );
    assert_eq!(server.model_lists.load(Ordering::SeqCst), 1);
    assert_eq!((r.requests.ok, r.requests.failed), (4, 0));
    assert_eq!(r.output_tokens, 20);
    assert_eq!(r.requests.token_count_mismatch, 0);
    assert_eq!(r.requests.mean_prompt_tokens, Some(8.0));
    // Five tokens per stream: four gaps each.
    assert_eq!(r.itl_ms.count, 16);
    assert_eq!(r.ttft_ms.count, 4);
    let ttft = r.ttft_ms.p50.unwrap();
    let itl = r.itl_ms.p50.unwrap();
    // Lower bounds are exact (the server sleeps at least that long); upper bounds allow for a
    // busy machine.
    assert!((150.0..600.0).contains(&ttft), "TTFT p50 {ttft} ms");
    assert!((40.0..200.0).contains(&itl), "ITL p50 {itl} ms");
    assert!(r.itl_ms.min.unwrap() >= 39.0, "{:?}", r.itl_ms);
    // Two waves of 150 + 4 × 40 ms.
    assert!(r.wall_s >= 0.6, "wall {}", r.wall_s);
    assert!((r.output_tokens_per_s - 20.0 / r.wall_s).abs() < 1e-9);
    let per_stream = r.stream_tokens_per_s.mean.unwrap();
    assert!(per_stream > 0.0 && per_stream <= 5.0 / 0.31, "{per_stream}");
    assert!(!r.timed_out);
    assert!(r.long_prompt.is_none() && r.baseline.is_none());
    let text = r.to_string();
    assert!(text.contains("4 ok, 0 failed"), "{text}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["ttft_ms"]["count"], 4);
    assert_eq!(json["config"]["endpoint"], "completions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_split_into_tiny_chunks_decode_and_count_per_chunk() {
    // Three-byte HTTP chunks cut every SSE line, JSON value and UTF-8 run; no usage at all, so
    // tokens are counted one per chunk that carries text.
    let server = start(Behavior {
        split: Some(3),
        usage: false,
        ..Behavior::default()
    })
    .await;
    let r = run(&config(&server.url, 3, 6, 7)).await.unwrap();
    assert_eq!((r.requests.ok, r.requests.failed), (6, 0), "{r}");
    assert_eq!(r.output_tokens, 42);
    assert_eq!(r.itl_ms.count, 6 * 6);
    assert_eq!(r.requests.mean_prompt_tokens, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_close_bodies_and_the_chat_endpoint() {
    let server = start(Behavior {
        until_close: true,
        ..Behavior::default()
    })
    .await;
    let mut c = config(&server.url, 2, 4, 6);
    c.endpoint = Endpoint::Chat;
    c.model = Some("fake-model".into());
    let r = run(&c).await.unwrap();
    assert_eq!(
        server.model_lists.load(Ordering::SeqCst),
        0,
        "--model skips the list"
    );
    assert_eq!((r.requests.ok, r.requests.failed), (4, 0), "{r}");
    // The role-only first chunk and the empty finish chunk carry no tokens.
    assert_eq!(r.output_tokens, 24);
    assert_eq!(r.itl_ms.count, 4 * 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_recorded_and_not_retried() {
    let server = start(Behavior {
        reject_first: 3,
        retry_after: Some("0"),
        ..Behavior::default()
    })
    .await;
    let r = run(&config(&server.url, 1, 5, 3)).await.unwrap();
    assert_eq!(server.generations.load(Ordering::SeqCst), 5, "no retries");
    assert_eq!((r.requests.ok, r.requests.failed), (2, 3));
    assert_eq!(r.requests.retries_429, 0);
    assert_eq!(r.errors.len(), 1);
    let e = &r.errors[0];
    assert_eq!((e.kind.as_str(), e.count), ("HTTP 429", 3));
    assert!(
        e.example.contains("/v1/completions") && e.example.contains("retry later"),
        "{}",
        e.example
    );
    assert_eq!(r.output_tokens, 6, "only completed requests count");
    assert!(!r.timed_out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_429_retries_after_retry_after() {
    let server = start(Behavior {
        reject_first: 3,
        retry_after: Some("0.05"),
        ..Behavior::default()
    })
    .await;
    let mut c = config(&server.url, 1, 5, 3);
    c.retry_429 = true;
    let r = run(&c).await.unwrap();
    assert_eq!(server.generations.load(Ordering::SeqCst), 8);
    assert_eq!((r.requests.ok, r.requests.failed), (5, 0), "{r}");
    assert_eq!(r.requests.retries_429, 3);
    assert!(r.errors.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded_too() {
    let server = start(Behavior {
        reject_first: usize::MAX,
        retry_after: Some("0"),
        ..Behavior::default()
    })
    .await;
    let mut c = config(&server.url, 2, 3, 3);
    c.retry_429 = true;
    c.max_retries = 4;
    let r = run(&c).await.unwrap();
    assert_eq!(server.generations.load(Ordering::SeqCst), 3 * 5);
    assert_eq!((r.requests.ok, r.requests.failed), (0, 3));
    assert_eq!(r.requests.retries_429, 12);
    assert_eq!(r.errors[0].kind, "HTTP 429");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_ends_after_exactly_the_requests_asked_for() {
    let server = start(Behavior::default()).await;
    let r = run(&config(&server.url, 3, 7, 4)).await.unwrap();
    assert_eq!(server.generations.load(Ordering::SeqCst), 7);
    assert_eq!(r.requests.ok, 7);
    assert_eq!(r.output_tokens, 28);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_is_cut_off_at_the_time_limit() {
    let server = start(Behavior {
        hang: true,
        ..Behavior::default()
    })
    .await;
    let mut c = config(&server.url, 2, 10, 4);
    c.model = Some("m".into());
    c.timeout = Duration::from_millis(800);
    c.long_prompt = Some(LongPrompt {
        tokens: 50,
        after: Duration::ZERO,
    });
    let t = Instant::now();
    let r = run(&c).await.unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(took >= Duration::from_millis(800));
    assert!(r.timed_out);
    assert_eq!(r.requests.ok, 0);
    assert_eq!(r.requests.failed, 2);
    assert_eq!(r.requests.not_started, 8);
    assert_eq!(r.errors[0].kind, "timeout");
    assert!(
        r.errors[0].example.contains("0.8 s"),
        "{}",
        r.errors[0].example
    );
    // No stream ever decoded, so the long prompt waited for a steady state that never came.
    let l = r.long_prompt.as_ref().unwrap();
    assert!(!l.sent && !l.ok, "{l:?}");
    assert!(l.error.as_ref().unwrap().contains("never sent"), "{l:?}");
    assert!(r.to_string().contains("long prompt    not sent"));

    // Without --model the model list itself is what times out, and the run cannot start.
    c.model = None;
    let e = run(&c).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("/v1/models"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_names_the_url() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let e = run(&config(&url, 1, 1, 1)).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Connect { .. }), "{msg}");
    assert!(msg.contains(&format!("connecting to {url}")), "{msg}");
    assert!(msg.to_lowercase().contains("refused"), "{msg}");

    let mut c = config(&url, 2, 3, 1);
    c.model = Some("m".into());
    let r = run(&c).await.unwrap();
    assert_eq!((r.requests.ok, r.requests.failed), (0, 3));
    assert_eq!(
        (r.errors[0].kind.as_str(), r.errors[0].count),
        ("connect", 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_200_reports_the_servers_message() {
    let server = start(Behavior {
        fail_with: Some((400, "Token id 5000 is out of vocabulary (size 1024).")),
        ..Behavior::default()
    })
    .await;
    let r = run(&config(&server.url, 1, 2, 1)).await.unwrap();
    assert_eq!(r.errors[0].kind, "HTTP 400");
    assert!(
        r.errors[0]
            .example
            .ends_with("HTTP 400: Token id 5000 is out of vocabulary (size 1024)."),
        "{}",
        r.errors[0].example
    );
    let bad = run(&Config {
        concurrency: 0,
        ..config(&server.url, 1, 1, 1)
    })
    .await
    .unwrap_err();
    assert!(matches!(bad, Error::Config(_)), "{bad}");
    let bad = run(&config("https://example.com", 1, 1, 1))
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("https is not supported"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_long_prompts_prefill_window_is_reported_apart() {
    // Four streams of 40 tokens, 20 ms apart; the long prompt stalls every stream for 400 ms.
    let server = start(Behavior {
        ttft: Duration::from_millis(10),
        itl: Duration::from_millis(20),
        long_threshold: 100,
        prefill: Duration::from_millis(400),
        ..Behavior::default()
    })
    .await;
    let mut c = config(&server.url, 4, 4, 40);
    c.long_prompt = Some(LongPrompt {
        tokens: 500,
        after: Duration::from_millis(200),
    });
    c.single_stream_baseline = true;
    let r = run(&c).await.unwrap();
    assert_eq!((r.requests.ok, r.requests.failed), (4, 0), "{r}");
    assert_eq!(
        r.output_tokens, 160,
        "the long prompt's token is not counted"
    );
    let l = r.long_prompt.as_ref().unwrap();
    assert!(l.sent && l.ok, "{l:?}");
    assert_eq!(l.prompt_tokens, Some(500));
    let at = l.submitted_at_s.unwrap();
    assert!(at >= 0.2, "sent at {at} s");
    assert!(l.ttft_ms.unwrap() >= 400.0, "{l:?}");
    assert_eq!(l.streams_in_window, 4);
    let (during, outside) = (&l.itl_during_prefill_ms, &l.itl_outside_prefill_ms);
    assert!(during.count >= 4, "{during:?}");
    assert!(during.max.unwrap() >= 350.0, "{during:?}");
    assert!(during.p99.unwrap() >= 350.0, "{during:?}");
    // Every interval is in exactly one of the two.
    assert_eq!(during.count + outside.count, r.itl_ms.count);
    assert!(outside.max.unwrap() < 300.0, "{outside:?}");
    assert!(outside.p50.unwrap() < 100.0, "{outside:?}");
    // The stall is also what the overall ITL max shows.
    assert!(r.itl_ms.max.unwrap() >= 350.0);
    let b = r.baseline.as_ref().unwrap();
    assert!(b.ok && b.output_tokens == 40, "{b:?}");
    assert!(b.tokens_per_s.unwrap() > 0.0 && b.aggregate_over_single.unwrap() > 0.0);
    assert_eq!(
        server.generations.load(Ordering::SeqCst),
        4 + 1 + 1,
        "streams, baseline, long prompt"
    );
    let text = r.to_string();
    assert!(text.contains("ITL ms during its prefill"), "{text}");
    assert!(text.contains("single stream"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_after_the_streams_is_still_sent_and_says_so() {
    let server = start(Behavior::default()).await;
    let mut c = config(&server.url, 2, 2, 3);
    c.long_prompt = Some(LongPrompt {
        tokens: 50,
        after: Duration::from_millis(500),
    });
    let r = run(&c).await.unwrap();
    let l = r.long_prompt.as_ref().unwrap();
    assert!(l.sent && l.ok, "{l:?}");
    assert_eq!(l.streams_in_window, 0);
    assert_eq!(l.itl_during_prefill_ms.count, 0);
    assert_eq!(l.itl_during_prefill_ms.p50, None);
    assert!(r.to_string().contains("no stream was decoding"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_cannot_fit_the_context_is_refused_before_it_starts() {
    let server = start(Behavior {
        max_model_len: Some(4096),
        ..Behavior::default()
    })
    .await;
    let mut c = config(&server.url, 2, 2, 3);
    c.long_prompt = Some(LongPrompt {
        tokens: 16384,
        after: Duration::ZERO,
    });
    let e = run(&c).await.unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("16384")
            && text.contains("4096")
            && text.contains("--long-prompt-tokens 4095"),
        "{text}"
    );
    assert_eq!(
        server.generations.load(Ordering::SeqCst),
        0,
        "nothing was sent"
    );

    // Prompt + max_tokens of the streams themselves.
    c.long_prompt = None;
    c.prompt_len = 4000;
    c.max_tokens = 100;
    let e = run(&c).await.unwrap_err();
    assert!(e.to_string().contains("4100 tokens"), "{e}");

    // What fits runs.
    c.prompt_len = 8;
    c.long_prompt = Some(LongPrompt {
        tokens: 4095,
        after: Duration::ZERO,
    });
    let r = run(&c).await.unwrap();
    assert!(r.long_prompt.as_ref().unwrap().ok);
}
