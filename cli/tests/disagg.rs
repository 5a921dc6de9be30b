//! Prefill/decode disaggregation between real `myriad node attention --http` processes (the
//! tiny fixtures, every expert in-process, one kernel thread each, dev certificates for the
//! QUIC state transfer): a decode node that hands every prompt to a prefill node answers
//! exactly what a single node does (token ids and log-probabilities, whole and streamed, both
//! families) and says so in `x-myriad-path`, the prompt tokens are prefilled on the prefill
//! node only; a short prompt stays on the decode node; a prefill node that refuses or is
//! killed is skipped for the next, and with none left the client gets an error naming each;
//! a peer that sends the state receiver garbage is refused and the node keeps serving.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use myriad_transport::{Connector, Frame, QuicConnector, QuicLimits, TlsConfig};
use myriad_wire::{FrameKind, Message, StateBegin};
use serde_json::{Value, json};

mod common;
#[path = "common/fake_prefill.rs"]
mod fake_prefill;
#[path = "common/nodes.rs"]
mod nodes;

use nodes::{Proc, Reply, eventually, free_udp_port, http, metrics, sample};

const FAMILIES: [&str; 2] = ["qwen3_5_moe-tiny", "qwen3_next-tiny"];
const PROMPT_TOKENS: &str = "myriad_engine_prompt_tokens_total";

/// `myriad node attention --http` on the fixture `model` with `extra` flags.
fn node(model: &str, extra: &[&str]) -> Proc {
    let dir = common::fixture(model);
    let mut args = vec![
        "node",
        "attention",
        "--model",
        dir.to_str().unwrap(),
        "--http",
        "127.0.0.1:0",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    Proc::start(&args)
}

/// The fixture's reference prompts (lengths 1, 7, 33, 130; the chat one left out).
fn prompts(model: &str) -> Vec<Vec<u32>> {
    let r = common::reference(&common::fixture(model));
    r["prompts"].as_array().unwrap()[..4]
        .iter()
        .map(|p| common::ids(&p["input_ids"]))
        .collect()
}

/// A greedy completion of `prompt` with its prompt's and tokens' log-probabilities, tokens
/// written as their ids.
fn completion(model: &str, prompt: &[u32], stream: bool) -> Value {
    json!({
        "model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0,
        "ignore_eos": true, "echo": true, "logprobs": 5, "stream": stream,
        "return_tokens_as_token_ids": true,
    })
}

/// The parts of a whole answer that do not change from one request to the next.
fn answer(r: &Reply) -> Value {
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    json!({"choices": v["choices"], "usage": v["usage"]})
}

/// The choices of every chunk of a streamed answer.
fn chunks(r: &Reply) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", r.body);
    let events = r.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.body
    );
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"].clone())
        .collect()
}

fn path_of(r: &Reply) -> Option<&str> {
    r.header("x-myriad-path")
}

#[test]
fn a_decode_node_answers_what_a_single_node_does() {
    let t0 = Instant::now();
    for model in FAMILIES {
        let mut single = node(model, &[]);
        let mut prefill = node(model, &["--role", "prefill", "--insecure-dev-certs"]);
        let (single, p) = (single.ready(), prefill.ready());
        let mut decode = node(
            model,
            &[
                "--role",
                "decode",
                "--prefill-nodes",
                &p,
                "--disagg-min-prompt-tokens",
                "1",
                "--insecure-dev-certs",
            ],
        );
        let d = decode.ready();
        let load = http(&p, "GET", "/internal/load", None).json();
        assert_eq!(load["role"], "prefill", "{load}");
        assert_eq!(
            http(&d, "GET", "/internal/load", None).json()["role"],
            "decode"
        );

        let prompts = prompts(model);
        let mut prompt_tokens = 0;
        for prompt in &prompts {
            let want = http(
                &single,
                "POST",
                "/v1/completions",
                Some(&completion(model, prompt, false)),
            );
            assert_eq!(path_of(&want), Some("direct"));
            let got = http(
                &d,
                "POST",
                "/v1/completions",
                Some(&completion(model, prompt, false)),
            );
            assert_eq!(path_of(&got), Some("disaggregated"), "{model} {}", got.body);
            let want = answer(&want);
            assert_eq!(
                answer(&got),
                want,
                "{model}, a prompt of {} tokens",
                prompt.len()
            );
            assert_eq!(
                want["choices"][0]["logprobs"]["tokens"]
                    .as_array()
                    .unwrap()
                    .len(),
                prompt.len() + 4
            );
            prompt_tokens += prompt.len();
        }
        // Streamed, chunk for chunk.
        for prompt in &prompts[2..] {
            let want = chunks(&http(
                &single,
                "POST",
                "/v1/completions",
                Some(&completion(model, prompt, true)),
            ));
            let got = http(
                &d,
                "POST",
                "/v1/completions",
                Some(&completion(model, prompt, true)),
            );
            assert_eq!(path_of(&got), Some("disaggregated"));
            assert_eq!(
                chunks(&got),
                want,
                "{model}, streamed, {} tokens",
                prompt.len()
            );
            prompt_tokens += prompt.len();
        }
        // Every prompt token was prefilled on the prefill node, none on the decode node; the
        // prefill node holds no KV blocks afterwards.
        let pm = metrics(&p);
        assert_eq!(sample(&pm, PROMPT_TOKENS), prompt_tokens as f64, "{pm}");
        assert_eq!(sample(&metrics(&d), PROMPT_TOKENS), 0.0);
        eventually(
            Duration::from_secs(10),
            "the prefill node's blocks back",
            || http(&p, "GET", "/internal/load", None).json()["kv_blocks_used"] == 0,
        );
    }
    eprintln!("the equality test took {:.1}s", t0.elapsed().as_secs_f64());
}

#[test]
fn short_prompts_stay_and_failed_prefill_nodes_are_skipped() {
    let t0 = Instant::now();
    let model = FAMILIES[0];
    let dev = "--insecure-dev-certs";
    let mut p1 = node(model, &["--role", "prefill", dev]);
    let mut p2 = node(model, &["--role", "prefill", dev]);
    let (p1_url, p2_url) = (p1.ready(), p2.ready());
    // Reports no load at all (it sorts first) and refuses every prefill with a 503.
    let fake = fake_prefill::refusing();
    let state_addr = format!("127.0.0.1:{}", free_udp_port());
    let mut decode = node(
        model,
        &[
            "--role",
            "decode",
            "--prefill-nodes",
            &format!("{p1_url},{},{p2_url}", fake.url),
            "--disagg-min-prompt-tokens",
            "20",
            "--state-listen",
            &state_addr,
            dev,
        ],
    );
    let d = decode.ready();
    let prompts = prompts(model);
    let (short, long) = (&prompts[1], &prompts[2]);
    assert!(short.len() < 20 && long.len() >= 20);

    // (b) A prompt under the threshold is prefilled where it decodes.
    let r = http(
        &d,
        "POST",
        "/v1/completions",
        Some(&completion(model, short, false)),
    );
    assert_eq!(path_of(&r), Some("direct"), "{}", r.body);
    answer(&r);
    assert_eq!(sample(&metrics(&d), PROMPT_TOKENS), short.len() as f64);
    let on_prefill_nodes =
        || sample(&metrics(&p1_url), PROMPT_TOKENS) + sample(&metrics(&p2_url), PROMPT_TOKENS);
    assert_eq!(on_prefill_nodes(), 0.0);

    // A long one is handed off: the fake node, least loaded, is tried first and refuses; p1
    // prefills (p1 and p2 are equally idle: the configured order holds).
    let first = http(
        &d,
        "POST",
        "/v1/completions",
        Some(&completion(model, long, false)),
    );
    assert_eq!(path_of(&first), Some("disaggregated"), "{}", first.body);
    let want = answer(&first);
    assert_eq!(fake.prefill_calls(), 1);
    assert_eq!(sample(&metrics(&p1_url), PROMPT_TOKENS), long.len() as f64);

    // (d) A peer that is no prefill node: a StateBegin nobody expects, a garbage chunk, a
    // frame of another kind. Each is refused with an error frame; the node serves on.
    bad_peer(&state_addr);
    let r = http(
        &d,
        "POST",
        "/v1/completions",
        Some(&completion(model, long, false)),
    );
    assert_eq!(answer(&r), want);
    assert_eq!(
        sample(&metrics(&p1_url), PROMPT_TOKENS),
        2.0 * long.len() as f64
    );

    // (c) p1 killed (SIGKILL): its load cannot be read, so it goes last; the fake node
    // refuses again and p2 prefills.
    p1.kill();
    let r = http(
        &d,
        "POST",
        "/v1/completions",
        Some(&completion(model, long, false)),
    );
    assert_eq!(path_of(&r), Some("disaggregated"), "{}", r.body);
    assert_eq!(answer(&r), want);
    assert_eq!(fake.prefill_calls(), 3);
    assert_eq!(sample(&metrics(&p2_url), PROMPT_TOKENS), long.len() as f64);

    // None left: an OpenAI-style 503 naming every node; short prompts are still served.
    p2.kill();
    let r = http(
        &d,
        "POST",
        "/v1/completions",
        Some(&completion(model, long, false)),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "service_unavailable");
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    for url in [&p1_url, &p2_url, &fake.url] {
        assert!(message.contains(url.as_str()), "{url} not in {message}");
    }
    assert!(
        message.contains("no prefill node could prefill"),
        "{message}"
    );
    let r = http(
        &d,
        "POST",
        "/v1/completions",
        Some(&completion(model, short, false)),
    );
    assert_eq!(path_of(&r), Some("direct"), "{}", r.body);
    eventually(Duration::from_secs(10), "the decode node idle", || {
        let l = http(&d, "GET", "/internal/load", None).json();
        l["running"] == 0 && l["waiting"] == 0 && l["kv_blocks_used"] == 0
    });
    eprintln!("the failover test took {:.1}s", t0.elapsed().as_secs_f64());
}

/// Over mutual TLS, a client that leaves while its prompt waits on the prefill node: the
/// decode node drops its call, which cancels the prefill there before it ever runs (the
/// prefill node admits one sequence at a time, and two long streams hold it), and both nodes
/// are left with nothing.
#[test]
fn a_client_that_leaves_cancels_its_prefill() {
    let model = FAMILIES[1];
    // Mutual TLS this time: each node with its own certificate from one cluster CA.
    let pki = std::env::temp_dir().join(format!("myriad-disagg-{}", std::process::id()));
    myriad_transport::generate_pki(&pki, &["prefill", "decode"], "myriad-node").unwrap();
    let tls = |name: &str| -> Vec<String> {
        let file = |f: String| pki.join(f).to_str().unwrap().to_string();
        vec![
            "--tls-cert".into(),
            file(format!("{name}.pem")),
            "--tls-key".into(),
            file(format!("{name}.key")),
            "--tls-ca".into(),
            file("ca.pem".into()),
        ]
    };
    let (p_tls, d_tls) = (tls("prefill"), tls("decode"));
    let mut p_args = vec!["--role", "prefill", "--max-seqs", "1"];
    p_args.extend(p_tls.iter().map(String::as_str));
    let mut prefill = node(model, &p_args);
    let p = prefill.ready();
    let mut d_args = vec![
        "--role",
        "decode",
        "--prefill-nodes",
        &p,
        "--disagg-min-prompt-tokens",
        "1",
    ];
    d_args.extend(d_tls.iter().map(String::as_str));
    let mut decode = node(model, &d_args);
    let d = decode.ready();
    // A hand-off over mutual TLS works.
    let prompt = &prompts(model)[2];
    let r = http(
        &d,
        "POST",
        "/v1/completions",
        Some(&completion(model, prompt, false)),
    );
    assert_eq!(path_of(&r), Some("disaggregated"), "{}", r.body);
    answer(&r);
    let before = sample(&metrics(&p), PROMPT_TOKENS);
    assert_eq!(before, prompt.len() as f64);
    let _ = std::fs::remove_dir_all(&pki);

    let load = |url: &str| http(url, "GET", "/internal/load", None).json();
    let blocker = json!({
        "model": model, "prompt": [1, 2, 3], "max_tokens": 4000, "ignore_eos": true,
        "stream": true,
    });
    let mut b1 = nodes::send(&p, "POST", "/v1/completions", Some(&blocker));
    nodes::read_until_data(&mut b1);
    let b2 = nodes::send(&p, "POST", "/v1/completions", Some(&blocker));
    eventually(Duration::from_secs(10), "the second stream queued", || {
        load(&p)["waiting"] == 1
    });
    let long = &prompts(model)[3];
    let client = nodes::send(
        &d,
        "POST",
        "/v1/completions",
        Some(&completion(model, long, false)),
    );
    eventually(Duration::from_secs(10), "the prefill queued", || {
        load(&p)["waiting"] == 2
    });
    drop(client);
    // Cancelled while it waits: the second stream still waits behind the first.
    eventually(Duration::from_secs(10), "the prefill cancelled", || {
        sample(&metrics(&p), "myriad_engine_cancelled_total") == 1.0 && load(&p)["waiting"] == 1
    });
    eventually(Duration::from_secs(10), "the decode node idle", || {
        let l = load(&d);
        l["running"] == 0 && l["waiting"] == 0 && l["kv_blocks_used"] == 0
    });
    drop((b1, b2));
    eventually(Duration::from_secs(10), "the prefill node idle", || {
        let l = load(&p);
        l["running"] == 0 && l["waiting"] == 0 && l["kv_blocks_used"] == 0
    });
    // Only the streams' prompts were prefilled there since, never the client's.
    let prefilled = sample(&metrics(&p), PROMPT_TOKENS) - before;
    assert!(prefilled <= 6.0, "{prefilled} prompt tokens prefilled");
    assert_eq!(sample(&metrics(&d), PROMPT_TOKENS), 0.0);
}

/// Sends the state receiver at `addr` what no prefill node would, over real QUIC: each frame
/// must be answered with an error frame.
fn bad_peer(addr: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let connector = QuicConnector::new(&TlsConfig::InsecureDev, QuicLimits::default()).unwrap();
        let conn = connector.connect(addr).await.unwrap();
        let begin = StateBegin {
            transfer_id: 0xdead_beef,
            state_version: myriad_wire::STATE_FORMAT_VERSION,
            model_fingerprint: 1,
            position: 1,
            tokens: vec![5],
            rng: [0; 4],
            generated: 0,
            layers: Vec::new(),
        };
        let hello = myriad_wire::Hello {
            client: "not a prefill node".into(),
            model_fingerprint: 1,
        };
        let mut garbage = 0xdead_beefu64.to_le_bytes().to_vec();
        garbage.extend([0xab; 40]);
        let frames = [
            (
                Frame::new(FrameKind::StateBegin, begin.encode()),
                "does not expect",
            ),
            (Frame::new(FrameKind::StateChunk, garbage), "undecodable"),
            (
                Frame::new(FrameKind::Hello, hello.encode()),
                "state receiver",
            ),
        ];
        for (frame, says) in frames {
            let kind = frame.kind;
            let reply = conn.call(frame, Duration::from_secs(10)).await.unwrap();
            assert_eq!(reply.kind, FrameKind::Error, "{kind:?}");
            let text = match myriad_wire::ErrorReply::decode(&reply.payload, &Default::default()) {
                Ok(e) => e.message,
                Err(_) => String::from_utf8_lossy(&reply.payload).into_owned(),
            };
            assert!(text.contains(says), "{kind:?}: {text}");
        }
    });
}
