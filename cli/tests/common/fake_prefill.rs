//! A fake prefill node for tests: it reports the lightest load there could be at
//! `GET /internal/load` (so a decode node tries it first) and refuses every
//! `POST /internal/prefill` with a 503, counting them.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;

pub struct FakePrefill {
    pub url: String,
    posts: Arc<AtomicUsize>,
}

impl FakePrefill {
    /// `POST /internal/prefill` calls answered so far.
    pub fn prefill_calls(&self) -> usize {
        self.posts.load(Ordering::SeqCst)
    }
}

/// Starts one on a free port (its thread lives as long as the test process).
pub fn refusing() -> FakePrefill {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let posts = Arc::new(AtomicUsize::new(0));
    let counted = posts.clone();
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
            let (status, body) = if first.starts_with("GET /internal/load ") {
                let load = json!({"role": "prefill", "running": 0, "waiting": 0,
                    "kv_blocks_used": 0, "kv_blocks_total": u32::MAX, "preemptions": 0});
                ("200 OK", load.to_string())
            } else {
                if first.starts_with("POST /internal/prefill ") {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                let error = json!({"error": {"message": "this fake node prefills nothing",
                    "type": "unavailable", "code": 503}});
                ("503 Service Unavailable", error.to_string())
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    FakePrefill { url, posts }
}
