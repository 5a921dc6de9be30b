//! The proxying handler for every `/v1` route: choose a node, send the request there, relay
//! the answer. A node that cannot take the request (no connection, the connection broken before
//! a response head, or a 503) is replaced by the next choice, each node at most once; only when
//! none is left does the client get a 503, as an OpenAI error object. Once a node's response
//! head has arrived the proxy is committed to it: its status, headers and body go to the
//! client unchanged, the body frame by frame as it comes. If that body breaks off, a stream of
//! server-sent events ends with an error event and `[DONE]`, as a node ends a stream whose
//! sequence failed, so clients see why it stopped; any other body is cut, as the node's was.
//! Generation requests are counted by the path that served them (the node's `x-myriad-path`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use myriad_engine_api::ServePath;
use serde::Serialize;

use super::client::{self, Connection};
use super::nodes::InFlight;
use super::state::ProxyState;
use crate::http::PATH_HEADER;
use crate::http::error::ApiError;
use crate::http::metrics::endpoint_label;

/// Most of a 503 body kept, to pass on when no other node takes the request.
const MAX_KEPT_BODY: usize = 64 << 10;
/// How long reading that body may take.
const KEPT_BODY_WAIT: Duration = Duration::from_secs(2);

/// Headers that describe one connection (or proxy), not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Every `/v1` request (after the proxy's API-key check).
pub(crate) async fn handle(
    State(state): State<Arc<ProxyState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => {
            return ApiError::from_body_rejection(r, state.config.max_body_bytes).into_response();
        }
    };
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let upstream_headers = request_headers(&headers, state.config.upstream_api_key.as_deref());
    let mut tried = vec![false; state.nodes.len()];
    let mut failure: Option<String> = None;
    let mut refused: Option<Response> = None;
    let mut attempts = 0;
    while let Some(i) = state.nodes.pick(&tried) {
        tried[i] = true;
        if attempts > 0 {
            state.metrics.retry();
        }
        attempts += 1;
        let node = state.nodes.get(i);
        let in_flight = node.start();
        let request = match build_request(
            &method,
            &node.url.target(path),
            &upstream_headers,
            body.clone(),
            &node.url.authority(),
        ) {
            Ok(r) => r,
            Err(e) => return e.into_response(),
        };
        match client::exchange(&node.url, request, state.config.connect_timeout).await {
            Err(e) => {
                state.metrics.upstream(i, None);
                if node.mark_down() {
                    eprintln!("attention node {} is out of rotation: {e}", node.label);
                }
                failure = Some(format!("{}: {e}", node.label));
            }
            Ok((response, _connection)) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                state.metrics.upstream(i, Some(503));
                failure = Some(format!("{} answered 503", node.label));
                let (parts, incoming) = response.into_parts();
                let kept = tokio::time::timeout(
                    KEPT_BODY_WAIT,
                    client::read_body(incoming, MAX_KEPT_BODY),
                )
                .await
                .unwrap_or_default();
                let mut r = Response::from_parts(parts, Body::from(kept));
                strip_hop_by_hop(r.headers_mut());
                r.headers_mut().remove(header::CONTENT_LENGTH);
                refused = Some(r);
            }
            Ok((response, connection)) => {
                state.metrics.upstream(i, Some(response.status().as_u16()));
                if is_generation(&method, uri.path()) && response.status().is_success() {
                    state.metrics.served(serve_path(response.headers()));
                }
                return relay(response, connection, in_flight, &node.label);
            }
        }
    }
    if let Some(r) = refused {
        // Every node that answered said 503: pass the last one's own error on.
        return r;
    }
    let message = match failure {
        Some(f) => {
            format!("No attention node could take the request ({attempts} tried; last: {f}).")
        }
        None => format!(
            "No attention node is healthy (0 of {} in rotation).",
            state.nodes.len()
        ),
    };
    ApiError::unavailable(message).into_response()
}

/// Whether a request is one whose responses say how they were served.
fn is_generation(method: &Method, path: &str) -> bool {
    *method == Method::POST
        && matches!(
            endpoint_label(path),
            "/v1/completions" | "/v1/chat/completions"
        )
}

/// The path a node's response says served it; a node that does not say (an older one)
/// served it directly.
fn serve_path(headers: &HeaderMap) -> ServePath {
    match headers.get(PATH_HEADER).map(HeaderValue::as_bytes) {
        Some(b"disaggregated") => ServePath::Disaggregated,
        _ => ServePath::Direct,
    }
}

/// The client's headers as sent on: without hop-by-hop headers, `Host`, `Authorization`
/// (replaced by the upstream key, if any), `Content-Length` and `Expect`.
fn request_headers(headers: &HeaderMap, upstream_key: Option<&str>) -> HeaderMap {
    let mut out = headers.clone();
    strip_hop_by_hop(&mut out);
    for h in [
        header::HOST,
        header::AUTHORIZATION,
        header::CONTENT_LENGTH,
        header::EXPECT,
    ] {
        out.remove(h);
    }
    if let Some(v) = upstream_key.and_then(|k| HeaderValue::try_from(format!("Bearer {k}")).ok()) {
        out.insert(header::AUTHORIZATION, v);
    }
    out
}

/// Removes the hop-by-hop headers and any header the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for h in named {
        headers.remove(h);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
}

fn build_request(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    body: Bytes,
    authority: &str,
) -> Result<hyper::Request<Body>, ApiError> {
    let mut request = hyper::Request::builder()
        .method(method.clone())
        .uri(target)
        .body(Body::empty())
        .map_err(|e| ApiError::invalid(format!("Cannot forward the request URL: {e}")))?;
    *request.headers_mut() = headers.clone();
    let h = request.headers_mut();
    if let Ok(host) = HeaderValue::try_from(authority) {
        h.insert(header::HOST, host);
    }
    if !body.is_empty() || !matches!(*method, Method::GET | Method::HEAD | Method::DELETE) {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    *request.body_mut() = Body::from(body);
    Ok(request)
}

/// The node's response as the client's: same status and headers (less hop-by-hop ones), the
/// body relayed as it arrives. An event stream loses any `Content-Length`, so that an error
/// event can follow if the node's body breaks off.
fn relay(
    response: hyper::Response<Incoming>,
    connection: Connection,
    in_flight: InFlight,
    node: &str,
) -> Response {
    let (mut parts, incoming) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().get(..17))
        .is_some_and(|v| v.eq_ignore_ascii_case("text/event-stream"));
    if sse {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let body = Relay {
        incoming,
        sse: sse.then(|| SseEnd {
            node: node.to_string(),
            at_boundary: true,
        }),
        done: false,
        _connection: connection,
        _in_flight: in_flight,
    };
    Response::from_parts(parts, Body::new(body))
}

/// A node's response body on its way to the client. It owns the upstream connection and the
/// node's in-flight count: when the body ends, or the client goes away and the server drops it,
/// the connection to the node closes and the count goes down.
struct Relay {
    incoming: Incoming,
    /// Set for an event stream: what ending it with an error event needs.
    sse: Option<SseEnd>,
    done: bool,
    _connection: Connection,
    _in_flight: InFlight,
}

/// How an event stream that breaks off is ended.
struct SseEnd {
    /// The node's URL, for the error message.
    node: String,
    /// Whether what was relayed so far ends between two events (or nothing was).
    at_boundary: bool,
}

/// The error object of a stream that broke off, as the nodes write error events.
#[derive(Serialize)]
struct ErrorEvent<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    r#type: &'static str,
    param: Option<()>,
    code: u16,
}

impl SseEnd {
    /// The bytes that end the client's stream after the node's body failed (`reason`): an
    /// error event, then `[DONE]`.
    fn error_events(&self, reason: &str) -> Bytes {
        let message = format!(
            "the attention node {} failed mid-stream: {reason}",
            self.node
        );
        let event = ErrorEvent {
            error: ErrorObject {
                message: &message,
                r#type: "server_error",
                param: None,
                code: StatusCode::BAD_GATEWAY.as_u16(),
            },
        };
        let json = serde_json::to_string(&event).unwrap_or_default();
        // A blank line first ends an event the node was cut off in, so the error is an event
        // of its own rather than the tail of a broken one.
        let lead = if self.at_boundary { "" } else { "\n\n" };
        Bytes::from(format!("{lead}data: {json}\n\ndata: [DONE]\n\n"))
    }
}

/// An error with its causes: hyper's own message rarely says what happened to the socket.
fn describe(error: &hyper::Error) -> String {
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        reason.push_str(": ");
        reason.push_str(&e.to_string());
        source = e.source();
    }
    reason
}

impl http_body::Body for Relay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut this.incoming).poll_frame(cx);
        match (polled, this.sse.as_mut()) {
            (Poll::Ready(Some(Ok(frame))), Some(sse)) => {
                if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
                    sse.at_boundary = data.ends_with(b"\n\n");
                }
                Poll::Ready(Some(Ok(frame)))
            }
            (Poll::Ready(Some(Err(e))), Some(sse)) => {
                let reason = describe(&e);
                eprintln!("attention node {} failed mid-stream: {reason}", sse.node);
                this.done = true;
                Poll::Ready(Some(Ok(Frame::data(sse.error_events(&reason)))))
            }
            (Poll::Ready(None), _) => {
                this.done = true;
                Poll::Ready(None)
            }
            (polled, _) => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.sse.is_some() {
            // An error event may follow what the node sends.
            SizeHint::default()
        } else {
            self.incoming.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_lose_credentials_and_hop_by_hop() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer client-key"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("host", "gateway:8000"),
            ("content-length", "12"),
            ("content-type", "application/json"),
            ("accept", "text/event-stream"),
            ("x-request-id", "abc"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = request_headers(&h, None);
        let mut names: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "content-type", "x-request-id"]);
        let out = request_headers(&h, Some("node-key"));
        assert_eq!(out[header::AUTHORIZATION], "Bearer node-key");
        let r = build_request(
            &Method::POST,
            "/v1/completions",
            &out,
            Bytes::from_static(b"{}"),
            "n:1",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.headers()[header::HOST], "n:1");
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "2");
        assert_eq!(r.uri(), "/v1/completions");
    }

    #[test]
    fn an_error_event_never_joins_a_cut_event() {
        let mut end = SseEnd {
            node: "http://n:1".into(),
            at_boundary: true,
        };
        let whole = end.error_events("gone");
        assert_eq!(
            whole,
            "data: {\"error\":{\"message\":\"the attention node http://n:1 failed mid-stream: \
             gone\",\"type\":\"server_error\",\"param\":null,\"code\":502}}\n\ndata: [DONE]\n\n"
        );
        end.at_boundary = false;
        assert_eq!(end.error_events("gone"), [&b"\n\n"[..], &whole].concat());
    }
}
