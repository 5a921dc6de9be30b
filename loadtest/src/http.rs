//! A minimal HTTP/1.1 client over tokio's `TcpStream`: one connection per request
//! (`Connection: close`), a status line and headers, and a body framed by chunked transfer
//! encoding, by `Content-Length`, or by the server closing the connection.
//!
//! Written by hand so the load generator adds no HTTP stack to the build, and so that what is
//! measured is the server: the body is handed over as soon as bytes arrive, with no buffering
//! layer between the socket and the SSE parser. Every read is bounded in size (line lengths,
//! header counts, error bodies) so a misbehaving server cannot make the client grow without
//! limit; time is bounded by the caller, which runs every request under the run's deadline.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::error::Error;

/// The longest status, header, chunk-size or trailer line accepted.
const MAX_LINE: usize = 16 << 10;
/// The most headers (or trailers) accepted in one response.
const MAX_HEADERS: usize = 128;
/// The most interim (1xx) responses skipped before the real one.
const MAX_INTERIM: usize = 8;
/// How much of an error body is read to find its message.
pub const MAX_ERROR_BODY: usize = 64 << 10;

/// Where the server is: `http://host[:port][/prefix]`. A trailing `/v1` is dropped, so both
/// the server root and an OpenAI-style base URL (`http://host:8000/v1`) work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    host: String,
    port: u16,
    /// Path prefix without a trailing slash (usually empty).
    prefix: String,
}

impl BaseUrl {
    pub fn parse(url: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if url.starts_with("https://") {
            return Err(bad("https is not supported (plain http only)"));
        }
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("expected http://host:port"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(bad("user information in the URL is not supported"));
        }
        if path.contains(['?', '#']) {
            return Err(bad("the base URL takes no query or fragment"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed '[' in the host"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| bad("expected ':' after ']'"))?,
                    ),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| bad(&format!("bad port {p:?}")))?,
        };
        let mut prefix = path.trim_end_matches('/').to_string();
        if let Some(p) = prefix.strip_suffix("/v1") {
            prefix = p.to_string();
        }
        Ok(BaseUrl {
            host: host.to_string(),
            port,
            prefix,
        })
    }

    /// `host:port` as the `Host` header and messages write it.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The full URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.authority(), self.prefix, path)
    }

    /// The server root, as messages name it.
    pub fn root(&self) -> String {
        format!("http://{}{}", self.authority(), self.prefix)
    }
}

/// Sends one request on a fresh connection and reads the response head. `body` is JSON.
pub async fn send(
    base: &BaseUrl,
    method: &str,
    path: &str,
    api_key: Option<&str>,
    body: Option<&[u8]>,
) -> Result<Response<TcpStream>, Error> {
    let target = format!("{method} {}", base.url(path));
    let stream = TcpStream::connect((base.host.as_str(), base.port))
        .await
        .map_err(|e| Error::Connect {
            url: base.root(),
            cause: e.to_string(),
        })?;
    // One small write per request; without this Nagle could hold it back behind nothing.
    let _ = stream.set_nodelay(true);
    let mut head = format!(
        "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: myriad-loadtest\r\n\
         Accept: application/json, text/event-stream\r\nConnection: close\r\n",
        base.prefix,
        base.authority()
    );
    if let Some(key) = api_key {
        head.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    let mut stream = stream;
    let io = |e: std::io::Error| Error::Io {
        target: target.clone(),
        cause: format!("sending the request: {e}"),
    };
    stream.write_all(&bytes).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    Response::read(stream, target, method == "HEAD").await
}

/// A response whose head has been read; the body is read on demand with
/// [`Response::next_chunk`].
#[derive(Debug)]
pub struct Response<R> {
    pub status: u16,
    headers: Vec<(String, String)>,
    body: BodyReader<R>,
}

impl<R: AsyncRead + Unpin> Response<R> {
    /// Reads the status line and headers from `reader` (skipping interim 1xx responses).
    /// `target` (`METHOD URL`) names the request in errors.
    pub async fn read(reader: R, target: String, head_request: bool) -> Result<Self, Error> {
        let mut reader = BufReader::with_capacity(16 << 10, reader);
        let mut interim = 0;
        let (status, headers) = loop {
            let line = read_line(&mut reader, &target)
                .await?
                .ok_or_else(|| Error::Protocol {
                    target: target.clone(),
                    reason: "the server closed the connection without a response".into(),
                })?;
            let status = parse_status_line(&line).ok_or_else(|| Error::Protocol {
                target: target.clone(),
                reason: format!("bad status line {:?}", truncate(&line, 200)),
            })?;
            let headers = read_headers(&mut reader, &target).await?;
            if (100..200).contains(&status) && status != 101 {
                interim += 1;
                if interim > MAX_INTERIM {
                    return Err(Error::Protocol {
                        target,
                        reason: "too many interim (1xx) responses".into(),
                    });
                }
                continue;
            }
            break (status, headers);
        };
        let header = |name: &str| {
            headers
                .iter()
                .rev()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let framing = if head_request || status == 204 || status == 304 {
            Framing::Done
        } else if header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked(ChunkState::Size)
        } else if let Some(len) = header("content-length") {
            let len = len.trim().parse::<u64>().map_err(|_| Error::Protocol {
                target: target.clone(),
                reason: format!("bad Content-Length {len:?}"),
            })?;
            Framing::Length {
                left: len,
                total: len,
            }
        } else {
            // HTTP/1.1 without a length: the body runs until the server closes.
            Framing::UntilClose
        };
        Ok(Response {
            status,
            headers,
            body: BodyReader {
                reader,
                framing,
                target,
            },
        })
    }

    /// The value of header `name` (the last one, when repeated).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `Retry-After` in seconds (the HTTP-date form is not used by inference servers).
    pub fn retry_after(&self) -> Option<Duration> {
        let secs = self.header("retry-after")?.trim().parse::<f64>().ok()?;
        (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
    }

    /// `METHOD URL` of the request this answers.
    pub fn target(&self) -> &str {
        &self.body.target
    }

    /// The next piece of the body as it arrives, decoded from its framing; `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, Error> {
        self.body.next_chunk().await
    }

    /// The whole body, failing when it is longer than `limit` bytes.
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        while let Some(chunk) = self.next_chunk().await? {
            if out.len() + chunk.len() > limit {
                return Err(Error::Protocol {
                    target: self.body.target.clone(),
                    reason: format!("the body is longer than {limit} bytes"),
                });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// `Ok(self)` on 200; otherwise reads the error body and returns [`Error::Status`] with
    /// the server's message.
    pub async fn error_for_status(mut self) -> Result<Self, Error> {
        if self.status == 200 {
            return Ok(self);
        }
        let retry_after = self.retry_after();
        let message = match self.read_to_end(MAX_ERROR_BODY).await {
            Ok(body) => error_message(&body),
            Err(e) => format!("(the error body could not be read: {e})"),
        };
        Err(Error::Status {
            target: self.body.target.clone(),
            status: self.status,
            message,
            retry_after,
        })
    }
}

/// The message of an OpenAI error body (`{"error": {"message": ...}}`), or of a few other
/// common shapes, or else the start of the body as text.
pub fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let candidates = [
            v.pointer("/error/message"),
            v.get("error").filter(|e| e.is_string()),
            v.get("message"),
            v.get("detail"),
        ];
        if let Some(m) = candidates.into_iter().flatten().find_map(|m| m.as_str()) {
            return m.to_string();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".into()
    } else {
        truncate(text, 500).to_string()
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `HTTP/1.x CODE REASON` → CODE.
fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

async fn read_headers<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    target: &str,
) -> Result<Vec<(String, String)>, Error> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, target)
            .await?
            .ok_or_else(|| Error::Protocol {
                target: target.to_string(),
                reason: "the connection closed in the middle of the headers".into(),
            })?;
        if line.is_empty() {
            return Ok(headers);
        }
        if headers.len() >= MAX_HEADERS {
            return Err(Error::Protocol {
                target: target.to_string(),
                reason: format!("more than {MAX_HEADERS} headers"),
            });
        }
        let (name, value) = line.split_once(':').ok_or_else(|| Error::Protocol {
            target: target.to_string(),
            reason: format!("bad header line {:?}", truncate(&line, 200)),
        })?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
}

/// One line without its `\r\n` (or `\n`); `None` when the connection closed before any byte.
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    target: &str,
) -> Result<Option<String>, Error> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await.map_err(|e| Error::Io {
            target: target.to_string(),
            cause: format!("reading the response: {e}"),
        })?;
        if buf.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(Error::Protocol {
                target: target.to_string(),
                reason: "the connection closed in the middle of a line".into(),
            });
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if line.len() > MAX_LINE {
            return Err(Error::Protocol {
                target: target.to_string(),
                reason: format!("a header or chunk-size line longer than {MAX_LINE} bytes"),
            });
        }
        if done {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            // Header values are ASCII in practice; anything else is kept, lossily.
            return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
        }
    }
}

#[derive(Debug)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk with this many bytes left.
    Data(u64),
}

#[derive(Debug)]
enum Framing {
    Chunked(ChunkState),
    Length { left: u64, total: u64 },
    UntilClose,
    Done,
}

#[derive(Debug)]
struct BodyReader<R> {
    reader: BufReader<R>,
    framing: Framing,
    target: String,
}

impl<R: AsyncRead + Unpin> BodyReader<R> {
    fn protocol(&self, reason: impl Into<String>) -> Error {
        Error::Protocol {
            target: self.target.clone(),
            reason: reason.into(),
        }
    }

    /// Up to `max` buffered (or newly read) bytes; empty at end of stream.
    async fn take(&mut self, max: u64) -> Result<Vec<u8>, Error> {
        let buf = self.reader.fill_buf().await.map_err(|e| Error::Io {
            target: self.target.clone(),
            cause: format!("reading the response body: {e}"),
        })?;
        let n = buf.len().min(usize::try_from(max).unwrap_or(usize::MAX));
        let out = buf[..n].to_vec();
        self.reader.consume(n);
        Ok(out)
    }

    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, Error> {
        // Each pass consumes input (a size line, data, a trailer) or ends, so this loop is
        // bounded by the bytes the server sends, which the caller's deadline bounds in time.
        loop {
            match &mut self.framing {
                Framing::Done => return Ok(None),
                Framing::UntilClose => {
                    let data = self.take(u64::MAX).await?;
                    if data.is_empty() {
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                    return Ok(Some(data));
                }
                Framing::Length { left, total } => {
                    if *left == 0 {
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                    let (want, total) = (*left, *total);
                    let data = self.take(want).await?;
                    if data.is_empty() {
                        return Err(self.protocol(format!(
                            "the connection closed after {} of {total} body bytes",
                            total - want
                        )));
                    }
                    self.framing = Framing::Length {
                        left: want - data.len() as u64,
                        total,
                    };
                    return Ok(Some(data));
                }
                Framing::Chunked(ChunkState::Size) => {
                    let line = read_line(&mut self.reader, &self.target)
                        .await?
                        .ok_or_else(|| {
                            self.protocol("the connection closed before the last chunk")
                        })?;
                    // Chunk extensions (`;name=value`) carry nothing we need.
                    let digits = line.split(';').next().unwrap_or_default().trim();
                    let size = if digits.is_empty() || digits.len() > 15 {
                        None
                    } else {
                        u64::from_str_radix(digits, 16).ok()
                    }
                    .ok_or_else(|| {
                        self.protocol(format!("bad chunk size line {:?}", truncate(&line, 100)))
                    })?;
                    if size == 0 {
                        self.read_trailers().await?;
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                    self.framing = Framing::Chunked(ChunkState::Data(size));
                }
                Framing::Chunked(ChunkState::Data(left)) => {
                    let want = *left;
                    let data = self.take(want).await?;
                    if data.is_empty() {
                        return Err(self.protocol("the connection closed in the middle of a chunk"));
                    }
                    let left = want - data.len() as u64;
                    if left == 0 {
                        let end = read_line(&mut self.reader, &self.target).await?;
                        if end.as_deref() != Some("") {
                            return Err(self.protocol("a chunk is not followed by CRLF"));
                        }
                        self.framing = Framing::Chunked(ChunkState::Size);
                    } else {
                        self.framing = Framing::Chunked(ChunkState::Data(left));
                    }
                    return Ok(Some(data));
                }
            }
        }
    }

    /// The trailer section after the last chunk, up to its empty line (or the server closing).
    async fn read_trailers(&mut self) -> Result<(), Error> {
        for _ in 0..=MAX_HEADERS {
            match read_line(&mut self.reader, &self.target).await? {
                None => return Ok(()),
                Some(line) if line.is_empty() => return Ok(()),
                Some(_) => {}
            }
        }
        Err(self.protocol(format!("more than {MAX_HEADERS} trailer lines")))
    }
}
