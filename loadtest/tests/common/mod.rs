//! A tiny OpenAI-style server for the load generator's tests: `GET /v1/models` and streaming
//! `POST /v1/completions` / `/v1/chat/completions` that send fake tokens with set delays,
//! framed chunked (optionally split into tiny pieces) or until-close, plus the failure modes
//! the tests need (429s, a long prompt that stalls every stream while it "prefills", a server
//! that never answers).

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::RwLock;

#[derive(Clone, Debug)]
pub struct Behavior {
    /// Before the first token.
    pub ttft: Duration,
    /// Between tokens.
    pub itl: Duration,
    /// Answer the first this-many generation requests with 429.
    pub reject_first: usize,
    /// `Retry-After` of those 429s.
    pub retry_after: Option<&'static str>,
    /// Chunked framing with each HTTP chunk at most this many bytes (and its size line written
    /// separately), so SSE lines and JSON span chunks; `None`: one chunk per event.
    pub split: Option<usize>,
    /// No Transfer-Encoding and no Content-Length: the body ends when the server closes.
    pub until_close: bool,
    /// Send usage at all (per chunk when the request asks for continuous usage).
    pub usage: bool,
    /// Prompts longer than this many tokens are "long": they stall every stream for
    /// `prefill` before their first token.
    pub long_threshold: usize,
    pub prefill: Duration,
    /// Read requests and never answer.
    pub hang: bool,
    /// Answer generation requests with this status and error message instead.
    pub fail_with: Option<(u16, &'static str)>,
    /// The `max_model_len` `GET /v1/models` gives, if any.
    pub max_model_len: Option<usize>,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            ttft: Duration::from_millis(5),
            itl: Duration::from_millis(2),
            reject_first: 0,
            retry_after: None,
            split: None,
            until_close: false,
            usage: true,
            long_threshold: usize::MAX,
            prefill: Duration::ZERO,
            hang: false,
            fail_with: None,
            max_model_len: None,
        }
    }
}

pub struct FakeServer {
    pub url: String,
    /// Generation requests received (including rejected ones).
    pub generations: Arc<AtomicUsize>,
    /// `GET /v1/models` requests received.
    pub model_lists: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct State {
    behavior: Behavior,
    generations: Arc<AtomicUsize>,
    model_lists: Arc<AtomicUsize>,
    /// Streams take it for reading before each token; a long prompt holds it for writing
    /// while it prefills, as a server's forward step stalls decoding during a big prefill.
    stall: RwLock<()>,
}

pub async fn start(behavior: Behavior) -> FakeServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let generations = Arc::new(AtomicUsize::new(0));
    let model_lists = Arc::new(AtomicUsize::new(0));
    let state = Arc::new(State {
        behavior,
        generations: generations.clone(),
        model_lists: model_lists.clone(),
        stall: RwLock::new(()),
    });
    let task = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let _ = handle(socket, &state).await;
            });
        }
    });
    FakeServer {
        url: format!("http://{addr}"),
        generations,
        model_lists,
        task,
    }
}

/// Reads one request: (method, path, body).
async fn read_request(socket: &mut TcpStream) -> std::io::Result<(String, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = socket.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let len = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>().unwrap())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = socket.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Ok((method, path, body))
}

async fn respond_json(socket: &mut TcpStream, status: u16, extra: &str, body: &Value) {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = socket.write_all(head.as_bytes()).await;
    let _ = socket.write_all(body.as_bytes()).await;
}

fn error_body(message: &str) -> Value {
    json!({"error": {"message": message, "type": "x", "param": null, "code": null}})
}

async fn handle(mut socket: TcpStream, state: &State) -> std::io::Result<()> {
    let b = &state.behavior;
    let (method, path, body) = read_request(&mut socket).await?;
    if b.hang {
        // Hold the connection open, answering nothing, until the client gives up.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return Ok(());
    }
    if method == "GET" && path == "/v1/models" {
        state.model_lists.fetch_add(1, Ordering::SeqCst);
        let mut model = json!({"id": "fake-model", "object": "model"});
        if let Some(n) = b.max_model_len {
            model["max_model_len"] = json!(n);
        }
        let list = json!({"object": "list", "data": [model]});
        respond_json(&mut socket, 200, "", &list).await;
        return Ok(());
    }
    let chat = match (method.as_str(), path.as_str()) {
        ("POST", "/v1/completions") => false,
        ("POST", "/v1/chat/completions") => true,
        _ => {
            respond_json(&mut socket, 404, "", &error_body("no such route")).await;
            return Ok(());
        }
    };
    let n = state.generations.fetch_add(1, Ordering::SeqCst);
    if n < b.reject_first {
        let extra = b
            .retry_after
            .map(|s| format!("Retry-After: {s}\r\n"))
            .unwrap_or_default();
        let msg = "The server is busy; retry later.";
        respond_json(&mut socket, 429, &extra, &error_body(msg)).await;
        return Ok(());
    }
    if let Some((status, msg)) = b.fail_with {
        respond_json(&mut socket, status, "", &error_body(msg)).await;
        return Ok(());
    }
    let req: Value = serde_json::from_slice(&body).unwrap();
    let max_tokens = req["max_tokens"].as_u64().unwrap();
    assert_eq!(req["ignore_eos"], true);
    assert_eq!(req["stream"], true);
    let prompt_len = if chat {
        req["messages"][0]["content"]
            .as_str()
            .unwrap()
            .split(' ')
            .count()
    } else {
        req["prompt"].as_array().unwrap().len()
    };
    let continuous = req["stream_options"]["continuous_usage_stats"] == true;
    let include_usage = req["stream_options"]["include_usage"] == true;

    let mut head = String::from("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n");
    if !b.until_close {
        head.push_str("Transfer-Encoding: chunked\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    socket.write_all(head.as_bytes()).await?;
    let mut out = Writer {
        socket,
        chunked: !b.until_close,
        split: b.split,
        writes: 0,
    };
    if chat {
        out.event(
            &json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        )
        .await?;
    }
    if prompt_len > b.long_threshold {
        let _prefilling = state.stall.write().await;
        tokio::time::sleep(b.prefill).await;
    } else {
        tokio::time::sleep(b.ttft).await;
    }
    for k in 1..=max_tokens {
        if k > 1 {
            tokio::time::sleep(b.itl).await;
        }
        drop(state.stall.read().await);
        let choice = if chat {
            json!({"index": 0, "delta": {"content": format!("t{k} ")}})
        } else {
            json!({"index": 0, "text": format!("t{k} ")})
        };
        let mut chunk = json!({"object": "chunk", "choices": [choice]});
        if b.usage && continuous {
            chunk["usage"] =
                json!({"prompt_tokens": prompt_len, "completion_tokens": k, "total_tokens": 0});
        }
        out.event(&chunk).await?;
    }
    // The finish chunk carries no text (and no new tokens).
    let finish = if chat {
        json!({"index": 0, "delta": {}, "finish_reason": "length"})
    } else {
        json!({"index": 0, "text": "", "finish_reason": "length"})
    };
    out.event(&json!({"choices": [finish]})).await?;
    if b.usage && include_usage {
        let usage = json!({"prompt_tokens": prompt_len, "completion_tokens": max_tokens});
        out.event(&json!({"choices": [], "usage": usage})).await?;
    }
    out.raw(b"data: [DONE]\n\n").await?;
    out.finish().await
}

/// Writes the SSE body in the configured framing.
struct Writer {
    socket: TcpStream,
    chunked: bool,
    split: Option<usize>,
    writes: usize,
}

impl Writer {
    async fn event(&mut self, v: &Value) -> std::io::Result<()> {
        // A keep-alive comment before some events, as servers send during long silences.
        if self.writes % 3 == 1 {
            self.raw(b": keep-alive\n\n").await?;
        }
        self.raw(format!("data: {v}\n\n").as_bytes()).await
    }

    async fn raw(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.writes += 1;
        if !self.chunked {
            self.socket.write_all(data).await?;
            return self.socket.flush().await;
        }
        let piece = self.split.unwrap_or(data.len()).max(1);
        for (i, part) in data.chunks(piece).enumerate() {
            // Chunk extensions on some chunks, and the size line flushed on its own, so the
            // client sees both a partial chunk header and a chunk split from its data.
            let ext = if i % 2 == 1 { ";ext=1" } else { "" };
            self.socket
                .write_all(format!("{:X}{ext}\r\n", part.len()).as_bytes())
                .await?;
            if self.split.is_some() {
                self.socket.flush().await?;
            }
            self.socket.write_all(part).await?;
            self.socket.write_all(b"\r\n").await?;
            self.socket.flush().await?;
        }
        Ok(())
    }

    async fn finish(mut self) -> std::io::Result<()> {
        if self.chunked {
            self.socket
                .write_all(b"0\r\nX-Trailer: done\r\n\r\n")
                .await?;
        }
        self.socket.flush().await?;
        self.socket.shutdown().await
    }
}
