//! The load generator's HTTP/1.1 client, on hyper's connection-level client: one fresh
//! connection per request (as a stream of its own, the way a new API client would connect),
//! the response head, then the body frame by frame as bytes arrive, with no buffering layer
//! between the socket and the SSE parser, so what is measured is the server.
//!
//! hyper decodes the framing (chunked, `Content-Length`, until close; interim 1xx responses)
//! and bounds header sizes; this module bounds what it keeps of a body (error bodies, the model
//! list), and the caller bounds time, running every request under the run's deadline.

use std::future::poll_fn;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::error::Error;

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
        // The `http` crate parses the URI (authority, IPv6 brackets, port range); what is
        // checked here is only what a base URL may be.
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(bad("https is not supported (plain http only)")),
            _ => return Err(bad("expected http://host:port")),
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information in the URL is not supported"));
        }
        if uri.query().is_some() {
            return Err(bad("the base URL takes no query or fragment"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let mut prefix = uri.path().trim_end_matches('/').to_string();
        if let Some(p) = prefix.strip_suffix("/v1") {
            prefix = p.to_string();
        }
        Ok(BaseUrl {
            host: host.to_string(),
            port: port_of(authority).ok_or_else(|| bad("bad port"))?,
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

/// The authority's port: 80 when none is written, `None` when it is not a number in 1-65535
/// (the `http` crate accepts any text there).
fn port_of(authority: &hyper::http::uri::Authority) -> Option<u16> {
    let written = &authority.as_str()[authority.host().len()..];
    match written.strip_prefix(':') {
        None => Some(80),
        Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0),
    }
}

/// Sends one request on a fresh connection and reads the response head. `body` is JSON.
pub async fn send(
    base: &BaseUrl,
    method: &str,
    path: &str,
    api_key: Option<&str>,
    body: Option<&[u8]>,
) -> Result<Response, Error> {
    let target = format!("{method} {}", base.url(path));
    let stream = TcpStream::connect((base.host.as_str(), base.port))
        .await
        .map_err(|e| Error::Connect {
            url: base.root(),
            cause: e.to_string(),
        })?;
    // One small write per request; without this Nagle could hold it back behind nothing.
    let _ = stream.set_nodelay(true);
    let protocol = |reason: String| Error::Protocol {
        target: target.clone(),
        reason,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| protocol(format!("starting HTTP/1.1: {e}")))?;
    let connection = Connection(tokio::spawn(async move {
        // Its error, if any, reaches us through the response or the body.
        let _ = conn.await;
    }));
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", base.prefix))
        .header(header::HOST, base.authority())
        .header(header::USER_AGENT, "myriad-loadtest")
        .header(header::ACCEPT, "application/json, text/event-stream");
    if let Some(key) = api_key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
        .map_err(|e| protocol(format!("building the request: {e}")))?;
    let response = sender.send_request(request).await.map_err(|e| {
        if e.is_parse() {
            protocol(format!("the response is not HTTP/1.1: {e}"))
        } else if e.is_incomplete_message() {
            protocol("the server closed the connection without a full response".into())
        } else {
            Error::Io {
                target: target.clone(),
                cause: format!("sending the request: {e}"),
            }
        }
    })?;
    let (head, body) = response.into_parts();
    Ok(Response {
        status: head.status.as_u16(),
        headers: head.headers,
        body,
        target,
        _connection: connection,
    })
}

/// The task driving one connection; aborted (socket closed) when the response is dropped.
#[derive(Debug)]
struct Connection(JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A response whose head has been read; the body is read on demand with
/// [`Response::next_chunk`].
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    headers: HeaderMap,
    body: Incoming,
    target: String,
    _connection: Connection,
}

impl Response {
    /// The value of header `name` (the last one, when repeated; `None` when not text).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get_all(name)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
    }

    /// `Retry-After` in seconds (the HTTP-date form is not used by inference servers).
    pub fn retry_after(&self) -> Option<Duration> {
        let secs = self.header("retry-after")?.trim().parse::<f64>().ok()?;
        (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
    }

    /// `METHOD URL` of the request this answers.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The next piece of the body as it arrives, decoded from its framing; `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, Error> {
        loop {
            match poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await {
                None => return Ok(None),
                Some(Ok(frame)) => {
                    // Trailers carry nothing the load generator reads.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Ok(Some(data.to_vec()));
                    }
                }
                Some(Err(e)) => {
                    return Err(Error::Protocol {
                        target: self.target.clone(),
                        reason: format!("the body broke off: {e}"),
                    });
                }
            }
        }
    }

    /// The whole body, failing when it is longer than `limit` bytes.
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        while let Some(chunk) = self.next_chunk().await? {
            if out.len() + chunk.len() > limit {
                return Err(Error::Protocol {
                    target: self.target.clone(),
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
            target: self.target.clone(),
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
