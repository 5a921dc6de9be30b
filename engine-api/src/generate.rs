//! [`Generate`]: what a front end needs from an engine that streams, and what flows through it.

use std::time::Duration;

use crate::request::{FinishReason, PositionLogprobs, Request};

/// What a running request hears, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Log-probabilities of the prompt positions (only with `echo` and `logprobs`; the first
    /// position has none). Sent once, before any token.
    PromptLogprobs(Vec<Option<PositionLogprobs>>),
    /// One generated token (with its log-probabilities when asked for).
    Token {
        id: u32,
        logprobs: Option<PositionLogprobs>,
    },
    /// The request ended; no event follows.
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed (the step it was in failed); no event follows.
    Failed(String),
    /// The request could not be served for want of a node that can (every prefill node is
    /// gone): a 503 to the client rather than a 500; no event follows.
    Unavailable(String),
}

/// Why a request was not accepted.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// The request itself is wrong (message names the problem): a 400.
    #[error("{0}")]
    Invalid(String),
    /// The request can never fit the memory budget (message says by how much): a 400.
    #[error("{0}")]
    TooLarge(String),
    /// The queue is full: retry later (a 429 with `Retry-After`).
    #[error("the server is at capacity ({waiting} requests waiting); retry after {retry_after:?}")]
    Overloaded {
        waiting: usize,
        retry_after: Duration,
    },
    /// The scheduler has stopped (a 503).
    #[error("the engine has stopped")]
    Stopped,
}

/// A request in flight: its events arrive on `events`; dropping it cancels the request.
#[derive(Debug)]
pub struct Submission {
    pub id: u64,
    pub events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    /// How the request is served.
    pub path: ServePath,
}

/// Whether a request's prompt is prefilled where it decodes, or on a prefill node whose
/// state then moves here (disaggregated prefill).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServePath {
    #[default]
    Direct,
    Disaggregated,
}

impl ServePath {
    /// The value of the `x-myriad-path` response header.
    pub fn as_str(self) -> &'static str {
        match self {
            ServePath::Direct => "direct",
            ServePath::Disaggregated => "disaggregated",
        }
    }
}

/// Counters for `/metrics` and load decisions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    /// Bytes of the KV blocks the running sequences hold.
    pub reserved_bytes: u64,
    /// Bytes of the KV block pool.
    pub memory_budget_bytes: u64,
    pub kv_blocks_used: u64,
    pub kv_blocks_total: u64,
    /// Sequences preempted (state dropped, recomputed later) since start.
    pub preemptions: u64,
    pub steps: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub cancelled: u64,
    pub rejected: u64,
}

/// What a front end needs from an engine that streams (the scheduler here; a remote attention
/// node later).
pub trait Generate: Send + Sync {
    fn submit(&self, request: Request) -> Result<Submission, SubmitError>;
    fn stats(&self) -> SchedulerStats;
    /// The model's context length (prompt + generated tokens).
    fn max_context(&self) -> usize;
}
