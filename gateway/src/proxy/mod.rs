//! The distributed front door, `myriad gateway --attention-nodes URL,…`: an HTTP reverse proxy
//! in front of several attention nodes, each of which serves the OpenAI API itself
//! (`myriad node attention --http`), as vLLM's router, SGLang's router and Dynamo's frontend
//! front their workers.
//!
//! Per request the proxy checks its own API keys, chooses the least-loaded decode or mixed node
//! in rotation (by the load the nodes report, see `choice`; a `prefill` node never takes
//! clients' requests), and sends the request there unchanged (without the client's
//! `Authorization`; with `--upstream-api-key` when the nodes want one). The response comes back
//! unchanged as it arrives: status, headers, and the body frame by frame, so server-sent events
//! pass through token by token; a stream the node breaks off ends with an error event. A node that cannot be reached, that
//! breaks the connection before answering, or that answers 503 is replaced by another one
//! before anything has been sent to the client; each node is tried at most once per request.
//! A client that goes away drops the response body, which closes the upstream connection, and
//! the node cancels the sequence as it would for a client of its own.
//!
//! - `config`: [`ProxyConfig`] and node URLs ([`NodeUrl`]).
//! - `choice`: the rule that picks a node, a pure function over a snapshot of their loads.
//! - `nodes`: the node table: health, role and reported load, requests in flight.
//! - `client`: one upstream exchange (hyper's connection-level HTTP/1.1 client over a tokio
//!   socket, one connection per request).
//! - `forward`: the proxying handler and the body that relays a response (ending a broken
//!   event stream with an error event).
//! - `health`: the background health checks (`GET /health` and `GET /internal/load` on every
//!   node).
//! - `metrics`: Prometheus `/metrics` (text format 0.0.4).
//! - `state`: [`ProxyState`], what every handler shares.
//! - `app`: [`proxy_router`], [`serve_proxy`], `/health`, `/metrics`.

mod app;
mod choice;
mod client;
mod config;
mod forward;
mod health;
mod metrics;
mod nodes;
mod state;

pub use app::{check_health, proxy_router, serve_proxy};
pub use config::{NodeUrl, ProxyConfig, ProxyError};
pub use state::ProxyState;
