//! `myriad-loadtest`: the load generator capacity planners use against an OpenAI-compatible
//! server (`myriad serve`, vLLM, ...).
//!
//! It keeps `concurrency` streaming requests running until `requests` have been made, each
//! asking for exactly `max_tokens` tokens (`ignore_eos`), and reports time to first token,
//! inter-token latencies and throughput, optionally next to a single stream of the same shape
//! (`single_stream_baseline`) and with one long prompt injected mid-run to show what its
//! prefill does to the running streams' inter-token latencies (`long_prompt`).
//!
//! - [`http`]: the HTTP/1.1 client (by hand over tokio's `TcpStream`; no TLS).
//! - [`sse`]: the server-sent-events parser.
//! - [`client`]: one measured streaming request.
//! - [`runner`]: the run ([`run`]).
//! - [`report`]: the summary, as JSON and as text.
//! - [`stats`]: the percentiles.
//! - [`prompt`]: reproducible random prompts and request bodies.

use std::time::Duration;

use serde::Serialize;

pub mod client;
pub mod error;
pub mod http;
pub mod prompt;
pub mod report;
pub mod runner;
pub mod sse;
pub mod stats;

pub use error::Error;
pub use report::Report;
pub use runner::run;

/// Which API the streams use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `POST /v1/completions` with random token-id prompts of exactly `prompt_len` tokens.
    Completions,
    /// `POST /v1/chat/completions` with one user message of `prompt_len` random words.
    Chat,
}

/// The long-prompt scenario: one extra request with a long prompt and `max_tokens` 1.
#[derive(Debug, Clone, PartialEq)]
pub struct LongPrompt {
    /// Its prompt length in tokens.
    pub tokens: usize,
    /// It is sent no earlier than this after the streams start, and only once every running
    /// stream is decoding (or all have finished).
    pub after: Duration,
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `http://host:port` (a trailing `/v1` is accepted).
    pub url: String,
    /// The model to request; `None`: the first one `GET /v1/models` lists.
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    pub endpoint: Endpoint,
    /// Prompt length of every stream, in tokens (words for chat).
    pub prompt_len: usize,
    /// Completions prompts draw token ids from `0..vocab_size`.
    pub vocab_size: u32,
    /// Streams running at once.
    pub concurrency: usize,
    /// Requests in all; the run ends after them.
    pub requests: usize,
    /// Tokens every stream asks for (and, with `ignore_eos`, gets).
    pub max_tokens: usize,
    /// Seeds the prompts and the requests' sampling.
    pub seed: u64,
    pub long_prompt: Option<LongPrompt>,
    /// First run one stream alone to compare the aggregate throughput with.
    pub single_stream_baseline: bool,
    /// Retry requests answered 429 (after `Retry-After`), up to `max_retries` times each.
    pub retry_429: bool,
    pub max_retries: u32,
    /// The whole run's time limit: whatever has not finished by then is cut off and counted.
    pub timeout: Duration,
}

impl Config {
    /// The defaults for a server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Config {
            url: url.into(),
            model: None,
            api_key: None,
            endpoint: Endpoint::Completions,
            prompt_len: 128,
            vocab_size: 1000,
            concurrency: 8,
            requests: 64,
            max_tokens: 128,
            seed: 0,
            long_prompt: None,
            single_stream_baseline: false,
            retry_429: false,
            max_retries: 10,
            timeout: Duration::from_secs(600),
        }
    }

    /// Rejects settings that cannot make a run.
    pub fn validate(&self) -> Result<(), Error> {
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::Config(what.to_string()))
            }
        };
        check(self.concurrency >= 1, "concurrency must be at least 1")?;
        check(self.requests >= 1, "requests must be at least 1")?;
        check(self.max_tokens >= 1, "max_tokens must be at least 1")?;
        check(self.prompt_len >= 1, "the prompt length must be at least 1")?;
        check(self.vocab_size >= 1, "vocab_size must be at least 1")?;
        check(!self.timeout.is_zero(), "the timeout must be positive")?;
        if let Some(lp) = &self.long_prompt {
            check(lp.tokens >= 1, "the long prompt needs at least 1 token")?;
        }
        Ok(())
    }
}
