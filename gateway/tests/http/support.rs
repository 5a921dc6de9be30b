//! Test support: a fake engine behind `Generate` (scripted tokens, optional delays, observes
//! cancellation), a server on 127.0.0.1:0 with the fixture tokenizer, and a tiny HTTP/1.1
//! client written on tokio's TCP stream (so the tests see the exact bytes on the wire).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use myriad_engine_api::{
    Event, FinishReason, Generate, PositionLogprobs, Request, SchedulerStats, ServePath,
    Submission, SubmitError, TokenLogprob,
};
use myriad_gateway::{ChatTemplate, GatewayConfig, GatewayState, Tokenizer, router, serve};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const MODEL: &str = "myriad-test";
/// The fake engine's context length.
pub const CONTEXT: usize = 2048;
/// `<|im_end|>`, the fixture's end-of-sequence token.
pub const EOS: u32 = 1013;

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/qwen3_5_moe-tiny")
}

pub fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&fixture_dir()).expect("fixture tokenizer")
}

/// What the fake generates for a request: its tokens (ending with EOS or not).
pub type Script = Arc<dyn Fn(&Request) -> Vec<u32> + Send + Sync>;
/// How the fake says it serves a request.
pub type PathRule = Arc<dyn Fn(&Request) -> ServePath + Send + Sync>;

/// A deterministic engine: each submission plays its script's tokens (one per `delay`),
/// honouring `max_tokens`, EOS / `stop_token_ids`, `logprobs` and `echo`.
pub struct FakeEngine {
    script: Mutex<Script>,
    /// Repeat the script forever (until max_tokens or cancellation).
    pub forever: std::sync::atomic::AtomicBool,
    delay: Mutex<Duration>,
    refuse: Mutex<Option<SubmitError>>,
    /// Reported by `stats` instead of the fake's own counts, when set.
    stats: Mutex<Option<SchedulerStats>>,
    path: Mutex<PathRule>,
    pub context: usize,
    pub submitted: Mutex<Vec<Request>>,
    /// Submissions whose receiver was dropped before they finished.
    pub cancelled: Arc<AtomicUsize>,
    pub finished: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
}

impl FakeEngine {
    pub fn new(context: usize) -> Arc<Self> {
        Arc::new(FakeEngine {
            script: Mutex::new(Arc::new(|_: &Request| vec![EOS])),
            forever: false.into(),
            delay: Mutex::new(Duration::ZERO),
            refuse: Mutex::new(None),
            stats: Mutex::new(None),
            path: Mutex::new(Arc::new(|_: &Request| ServePath::Direct)),
            context,
            submitted: Mutex::new(Vec::new()),
            cancelled: Arc::default(),
            finished: Arc::default(),
            running: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn set_script(&self, script: impl Fn(&Request) -> Vec<u32> + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Arc::new(script);
    }

    /// Every request generates `text` (tokenised) and, with `eos`, then EOS.
    pub fn reply(&self, text: &str, eos: bool) {
        let mut ids = tokenizer().encode(text).unwrap();
        if eos {
            ids.push(EOS);
        }
        self.set_script(move |_| ids.clone());
    }

    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }

    pub fn refuse_with(&self, e: Option<SubmitError>) {
        *self.refuse.lock().unwrap() = e;
    }

    pub fn set_stats(&self, stats: Option<SchedulerStats>) {
        *self.stats.lock().unwrap() = stats;
    }

    pub fn set_path(&self, rule: impl Fn(&Request) -> ServePath + Send + Sync + 'static) {
        *self.path.lock().unwrap() = Arc::new(rule);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.submitted.lock().unwrap().clone()
    }
}

/// Deterministic log-probabilities: the token itself at -0.5, then ids after it.
pub fn fake_logprobs(token: u32, k: usize) -> PositionLogprobs {
    PositionLogprobs {
        token_id: token,
        logprob: -0.5,
        top: (0..k)
            .map(|j| TokenLogprob {
                token_id: (token + j as u32) % 1000,
                logprob: -0.5 - j as f32,
            })
            .collect(),
    }
}

impl Generate for FakeEngine {
    fn submit(&self, request: Request) -> Result<Submission, SubmitError> {
        if let Some(e) = self.refuse.lock().unwrap().clone() {
            return Err(e);
        }
        self.submitted.lock().unwrap().push(request.clone());
        let script = self.script.lock().unwrap().clone();
        let tokens = script(&request);
        let path = (self.path.lock().unwrap().clone())(&request);
        let delay = *self.delay.lock().unwrap();
        let forever = self.forever.load(Ordering::SeqCst);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let running = Arc::clone(&self.running);
        running.fetch_add(1, Ordering::SeqCst);
        let (finished, cancelled) = (Arc::clone(&self.finished), Arc::clone(&self.cancelled));
        tokio::spawn(async move {
            let outcome = play(&request, &tokens, delay, forever, &tx).await;
            running.fetch_sub(1, Ordering::SeqCst);
            match outcome {
                Outcome::Finished => finished.fetch_add(1, Ordering::SeqCst),
                Outcome::Cancelled => cancelled.fetch_add(1, Ordering::SeqCst),
            };
        });
        Ok(Submission {
            id: 0,
            events: rx,
            path,
        })
    }

    fn stats(&self) -> SchedulerStats {
        if let Some(stats) = self.stats.lock().unwrap().clone() {
            return stats;
        }
        SchedulerStats {
            running: self.running.load(Ordering::SeqCst),
            waiting: 0,
            ..Default::default()
        }
    }

    fn max_context(&self) -> usize {
        self.context
    }
}

enum Outcome {
    Finished,
    Cancelled,
}

async fn play(
    request: &Request,
    tokens: &[u32],
    delay: Duration,
    forever: bool,
    tx: &tokio::sync::mpsc::UnboundedSender<Event>,
) -> Outcome {
    let prompt_tokens = request.prompt.len();
    if request.echo
        && let Some(k) = request.logprobs
    {
        let v = request
            .prompt
            .iter()
            .enumerate()
            .map(|(i, &t)| (i > 0).then(|| fake_logprobs(t, k)))
            .collect();
        if tx.send(Event::PromptLogprobs(v)).is_err() {
            return Outcome::Cancelled;
        }
    }
    let mut generated = 0;
    let mut reason = FinishReason::Length;
    let mut stream =
        tokens
            .iter()
            .copied()
            .cycle()
            .take(if forever { usize::MAX } else { tokens.len() });
    while generated < request.max_tokens {
        let Some(id) = stream.next() else {
            reason = FinishReason::Stop;
            break;
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        generated += 1;
        let logprobs = request.logprobs.map(|k| fake_logprobs(id, k));
        if tx.send(Event::Token { id, logprobs }).is_err() {
            return Outcome::Cancelled;
        }
        if (id == EOS && !request.ignore_eos) || request.stop_token_ids.contains(&id) {
            reason = FinishReason::Stop;
            break;
        }
    }
    if tx
        .send(Event::Finished {
            reason,
            prompt_tokens,
            completion_tokens: generated,
        })
        .is_err()
    {
        return Outcome::Cancelled;
    }
    Outcome::Finished
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub engine: Arc<FakeEngine>,
    pub state: Arc<GatewayState>,
}

pub fn config() -> GatewayConfig {
    let mut c = GatewayConfig::new(MODEL);
    c.keep_alive = None;
    c
}

pub async fn start() -> Server {
    start_with(config(), None).await
}

/// Starts a server; `template` replaces the fixture's chat template.
pub async fn start_with(config: GatewayConfig, template: Option<ChatTemplate>) -> Server {
    let engine = FakeEngine::new(CONTEXT);
    let template = template.or_else(|| Some(ChatTemplate::from_dir(&fixture_dir()).unwrap()));
    let state = Arc::new(GatewayState::new(
        config,
        tokenizer(),
        template,
        Arc::clone(&engine) as Arc<dyn Generate>,
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        router(Arc::clone(&state)),
        std::future::pending(),
    ));
    Server {
        addr,
        engine,
        state,
    }
}

// ---- HTTP client ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `data:` payloads of an SSE body, checking the framing: every event is one
    /// `data: …` line followed by a blank line, and the last is `[DONE]`.
    pub fn sse(&self) -> Vec<String> {
        let text = self.text();
        assert!(
            text.ends_with("data: [DONE]\n\n"),
            "no [DONE] at the end: {text}"
        );
        let mut out = Vec::new();
        for event in text.split_terminator("\n\n") {
            let data = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad SSE event {event:?}"));
            assert!(!data.contains('\n'), "multi-line event {event:?}");
            out.push(data.to_string());
        }
        assert_eq!(out.pop().as_deref(), Some("[DONE]"));
        assert!(!out.iter().any(|d| d == "[DONE]"), "[DONE] before the end");
        out
    }

    pub fn chunks(&self) -> Vec<Value> {
        self.sse()
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }
}

fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&request_bytes(method, path, headers, body))
        .await
        .unwrap();
    let mut raw = Vec::new();
    // The server may answer (413) before reading the whole body and then close; whatever it
    // sent before closing is the reply.
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw)).await;
    parse_reply(&raw)
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    send(addr, "POST", path, &[], body.to_string().as_bytes()).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    send(addr, "GET", path, &[], b"").await
}

pub fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// Decodes `Transfer-Encoding: chunked`.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = std::str::from_utf8(&raw[..eol]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        raw = &raw[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// Opens a streaming request and returns the socket after the request is written.
pub async fn open(addr: SocketAddr, path: &str, body: &Value) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&request_bytes(
            "POST",
            path,
            &[],
            body.to_string().as_bytes(),
        ))
        .await
        .unwrap();
    stream
}

/// Waits until `cond` holds (polling), or panics after 10 s.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}
