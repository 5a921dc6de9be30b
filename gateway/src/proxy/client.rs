//! One exchange with an attention node: a fresh TCP connection (with a connect timeout), an
//! HTTP/1.1 request through hyper's connection-level client, and the response head. The body
//! is left to the caller, who relays it frame by frame.
//!
//! The connection runs on its own task, which the returned [`Connection`] aborts when dropped:
//! dropping the relayed body (the client went away) therefore closes the socket to the node at
//! once, and the node cancels the sequence.

use std::future::poll_fn;
use std::pin::Pin;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::config::NodeUrl;

/// Why an exchange failed before a response head arrived.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// No connection: refused, unreachable, or not within the connect timeout.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// Connected, but the request could not be sent or no response head came back (the node
    /// closed the connection, or answered something that is not HTTP/1.1).
    #[error("no response: {0}")]
    Exchange(String),
    /// A health check took longer than its limit.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The task driving one upstream connection; aborted (socket closed) when dropped.
#[derive(Debug)]
pub(crate) struct Connection(JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends `request` (origin-form target, `Host` set) to `node` on a new connection and waits
/// for the response head.
pub(crate) async fn exchange(
    node: &NodeUrl,
    request: hyper::Request<Body>,
    connect_timeout: Duration,
) -> Result<(hyper::Response<Incoming>, Connection), UpstreamError> {
    let stream = match tokio::time::timeout(
        connect_timeout,
        TcpStream::connect((node.host(), node.port())),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(UpstreamError::Connect(e.to_string())),
        Err(_) => {
            return Err(UpstreamError::Connect(format!(
                "no connection within {connect_timeout:?}"
            )));
        }
    };
    // Requests are one small write, and relayed tokens must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| UpstreamError::Exchange(e.to_string()))?;
    let connection = Connection(tokio::spawn(async move {
        // Its error, if any, reaches the caller through the response or the body.
        let _ = conn.await;
    }));
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| UpstreamError::Exchange(e.to_string()))?;
    Ok((response, connection))
}

/// Most of a health check's or load report's body read.
const MAX_SMALL_BODY: usize = 64 << 10;

/// `GET path` on `node` within `limit` (connection, head and body): the status and (up to
/// 64 KiB of) the body.
pub(crate) async fn get(
    node: &NodeUrl,
    path: &str,
    api_key: Option<&str>,
    limit: Duration,
) -> Result<(u16, Bytes), UpstreamError> {
    let exchange = async {
        let mut request = hyper::Request::get(node.target(path))
            .header(hyper::header::HOST, node.authority())
            .header(hyper::header::USER_AGENT, "myriad-gateway");
        if let Some(key) = api_key {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = request
            .body(Body::empty())
            .map_err(|e| UpstreamError::Exchange(e.to_string()))?;
        let (response, _connection) = exchange(node, request, limit).await?;
        let status = response.status().as_u16();
        // Read the (small) body, also so the node sees a complete exchange.
        let body = read_body(response.into_body(), MAX_SMALL_BODY).await;
        Ok((status, body))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or(Err(UpstreamError::Timeout(limit)))
}

/// Up to `limit` bytes of `body` (less if it breaks off); what comes after is dropped.
pub(crate) async fn read_body(mut body: Incoming, limit: usize) -> Bytes {
    let mut out = Vec::new();
    while out.len() < limit {
        match poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let take = data.len().min(limit - out.len());
                    out.extend_from_slice(&data[..take]);
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    out.into()
}
