//! Running `myriad` node processes and talking plain HTTP/1.1 to them, for tests that start
//! several nodes: a child process killed however the test ends, its `ready` URL, one whole
//! exchange per connection, metrics samples, polling with a limit, free ports.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A child process, killed however the test ends.
pub struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// `myriad ARGS…`, its stdout piped for the ready line; its stderr is shown with
    /// `MYRIAD_TEST_LOGS=1`.
    pub fn start(args: &[&str]) -> Proc {
        let stderr = if std::env::var_os("MYRIAD_TEST_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        Proc(
            Command::new(env!("CARGO_BIN_EXE_myriad"))
                .args(args)
                .env_remove("MYRIAD_API_KEY")
                .env_remove("MYRIAD_UPSTREAM_API_KEY")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr)
                .spawn()
                .unwrap(),
        )
    }

    /// The URL of its `ready http://ADDR` line.
    pub fn ready(&mut self) -> String {
        let mut line = String::new();
        BufReader::new(self.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("expected a ready line, got {line:?}"))
            .to_string()
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    /// Its exit status, waiting at most `limit` (None: still running).
    pub fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return Some(s);
            }
            if t0.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// The `data:` payloads of an SSE body.
    pub fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|e| e.trim().strip_prefix("data: "))
            .map(String::from)
            .collect()
    }
}

/// Writes one request (`Connection: close`) on a new connection; reads nothing.
pub fn send(url: &str, method: &str, path: &str, body: Option<&Value>) -> TcpStream {
    send_with_timeout(url, method, path, body, Duration::from_secs(60))
}

/// [`send`] whose reads wait up to `timeout`.
pub fn send_with_timeout(
    url: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> TcpStream {
    send_as(url, method, path, None, body, timeout)
}

/// Writes one request (`Connection: close`) on a new connection, with `Authorization: Bearer
/// KEY` when `key` is given; its reads wait up to `timeout`.
pub fn send_as(
    url: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
    timeout: Duration,
) -> TcpStream {
    let addr = url.strip_prefix("http://").unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(k) = key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if method == "POST" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    s
}

/// Reads `s` until an SSE `data:` line has arrived (the stream is running).
pub fn read_until_data(s: &mut TcpStream) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
}

/// One whole exchange on a new connection (`Connection: close`), within 60 s.
pub fn http(url: &str, method: &str, path: &str, body: Option<&Value>) -> Reply {
    exchange(send(url, method, path, body))
}

/// One `POST path` whose answer may take up to `timeout` (a long prefill).
pub fn http_with_timeout(url: &str, path: &str, body: &Value, timeout: Duration) -> Reply {
    exchange(send_with_timeout(url, "POST", path, Some(body), timeout))
}

/// One whole exchange as [`http`], with `Authorization: Bearer KEY` when `key` is given.
pub fn http_as(
    url: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Reply {
    exchange(send_as(
        url,
        method,
        path,
        key,
        body,
        Duration::from_secs(60),
    ))
}

/// Reads a whole answer from `s`.
fn exchange(mut s: TcpStream) -> Reply {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Reply {
        status: status.parse().unwrap(),
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
}

/// The value of the sample `series` (name and labels) in a metrics text (0 when absent).
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// `GET /metrics`.
pub fn metrics(url: &str) -> String {
    let r = http(url, "GET", "/metrics", None);
    assert_eq!(r.status, 200);
    r.body
}

/// Polls `f` until it holds, for at most `limit`.
pub fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A UDP port that was free a moment ago on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
