//! The OpenAI-compatible HTTP API (with vLLM's extensions), on axum.
//!
//! - `state`: [`GatewayConfig`] and [`GatewayState`], what every handler shares.
//! - [`app`]: the routes ([`router`]), [`serve`] and the small endpoints.
//! - `auth`: bearer API keys; `error`: the OpenAI error object and every status.
//! - `params`: request fields and their validation; `openai`: the response types.
//! - `chat` (with `chat_request`: parsing and the prompt), `completions`: the two generation
//!   endpoints.
//! - `generation`: one request's sequences in the engine, detokenised and stop-checked;
//!   `sse`: streaming them as server-sent events.
//! - `stop`, `reasoning`, `tools`: incremental text processing (stop strings, `<think>`,
//!   `<tool_call>`), so streamed and full responses agree.
//! - `logprobs`: both log-probability formats; `metrics`: Prometheus `/metrics`.
//! - [`load`]: what a node tells the proxy in front of it: its load (`/internal/load`) and
//!   which path served each generation request (`x-myriad-path`).
//!
//! The engine is reached only through `myriad_engine_api::Generate`.

pub mod app;
pub(crate) mod auth;
mod chat;
mod chat_request;
mod completions;
pub mod error;
mod generation;
pub mod load;
mod logprobs;
pub mod metrics;
mod openai;
mod params;
mod reasoning;
mod sse;
mod state;
mod stop;
mod tools;

pub use app::{bind_and_serve, router, serve};
pub use error::ApiError;
pub use load::{LOAD_PATH, LoadReport, PATH_HEADER};
pub use metrics::Metrics;
pub use state::{GatewayConfig, GatewayError, GatewayState};
