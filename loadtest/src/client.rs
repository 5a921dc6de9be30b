//! One measured streaming request: send it, read its SSE chunks as they arrive, and record
//! when each chunk that carries tokens came in.
//!
//! Tokens are counted from `usage.completion_tokens` when the server puts usage on every chunk
//! (`stream_options.continuous_usage_stats`, which the request asks for): a chunk's tokens are
//! the increase since the previous chunk, exact even when the server held text back and
//! released several tokens at once. Without per-chunk usage, each choice that carries output
//! counts as one token, and the final usage chunk (`include_usage`) sets the total.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::Error;
use crate::http::{self, BaseUrl};
use crate::sse::SseParser;

/// A chunk that carried tokens: when it arrived (since the run's start) and how many.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenChunk {
    pub at: Duration,
    pub tokens: u64,
}

/// What one request did. Times are offsets from the run's start, so records of concurrent
/// requests can be compared (the long-prompt window is such a comparison).
#[derive(Debug, Clone, Default)]
pub struct RequestRecord {
    /// Which request of its phase (the prompt's random stream).
    pub index: usize,
    /// When the attempt that counts was sent (after 429 retries, the last one).
    pub start: Duration,
    /// When the first token arrived.
    pub first_token: Option<Duration>,
    /// Every chunk that carried tokens, in arrival order.
    pub chunks: Vec<TokenChunk>,
    /// When the request ended (its `[DONE]`, its failure, or the deadline).
    pub end: Duration,
    /// Output tokens (the final usage when the server sent one, else the chunks' sum).
    pub output_tokens: u64,
    /// Prompt tokens as the server counted them, when it sent usage.
    pub prompt_tokens: Option<u64>,
    /// 429 answers that were retried (`--retry-429`).
    pub retries_429: u32,
    /// Why it failed; `None` when it completed.
    pub error: Option<Error>,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// Time to first token.
    pub fn ttft(&self) -> Option<Duration> {
        self.first_token.map(|t| t.saturating_sub(self.start))
    }

    /// Inter-token latencies: `(previous chunk's arrival, this chunk's arrival)` for every
    /// token-carrying chunk after the first. One per chunk, not per token: the gap a reader
    /// of the stream sees.
    pub fn itl_intervals(&self) -> impl Iterator<Item = (Duration, Duration)> + '_ {
        self.chunks.windows(2).map(|w| (w[0].at, w[1].at))
    }
}

/// Where requests go and how to authenticate.
#[derive(Debug, Clone)]
pub struct Target {
    pub base: BaseUrl,
    pub path: &'static str,
    pub api_key: Option<String>,
}

/// Sends one streaming request and fills `rec` as it goes (so a request cut off by the
/// deadline keeps what it measured). `on_first_token` runs when the first token arrives.
pub async fn stream_once(
    target: &Target,
    body: &[u8],
    clock: Instant,
    rec: &mut RequestRecord,
    on_first_token: &mut (dyn FnMut() + Send),
) -> Result<(), Error> {
    rec.start = clock.elapsed();
    rec.first_token = None;
    rec.chunks.clear();
    rec.output_tokens = 0;
    rec.prompt_tokens = None;
    let resp = http::send(
        &target.base,
        "POST",
        target.path,
        target.api_key.as_deref(),
        Some(body),
    )
    .await?;
    let mut resp = resp.error_for_status().await?;
    let name = resp.target().to_string();
    let protocol = |reason: String| Error::Protocol {
        target: name.clone(),
        reason,
    };
    if let Some(ct) = resp.header("content-type")
        && !ct.to_ascii_lowercase().starts_with("text/event-stream")
    {
        return Err(protocol(format!(
            "expected an event stream, got Content-Type {ct}"
        )));
    }
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    let mut counter = Counter::default();
    // Bounded by the bytes the server sends; the caller's deadline bounds it in time.
    while let Some(bytes) = resp.next_chunk().await? {
        let now = clock.elapsed();
        parser.push(&bytes, &mut events).map_err(protocol)?;
        for data in events.drain(..) {
            if data.trim() == "[DONE]" {
                rec.end = clock.elapsed();
                rec.output_tokens = counter.final_usage.unwrap_or(counter.counted);
                rec.prompt_tokens = counter.prompt_tokens;
                return Ok(());
            }
            let v: Value = serde_json::from_str(&data).map_err(|e| {
                protocol(format!(
                    "an event that is not JSON ({e}): {:?}",
                    data.chars().take(200).collect::<String>()
                ))
            })?;
            if let Some(err) = v.get("error") {
                let message = err
                    .get("message")
                    .and_then(Value::as_str)
                    .map(String::from)
                    .unwrap_or_else(|| err.to_string());
                return Err(Error::Stream {
                    target: name.clone(),
                    message,
                });
            }
            let tokens = counter.tokens_in(&v);
            rec.output_tokens = counter.counted;
            if tokens > 0 {
                if rec.first_token.is_none() {
                    rec.first_token = Some(now);
                    on_first_token();
                }
                rec.chunks.push(TokenChunk { at: now, tokens });
            }
        }
    }
    Err(protocol(
        "the stream ended without `data: [DONE]`".to_string(),
    ))
}

/// Token accounting across one stream's chunks.
#[derive(Debug, Default)]
struct Counter {
    /// The latest cumulative `usage.completion_tokens` seen on a chunk with choices.
    usage_seen: u64,
    /// Tokens attributed to chunks so far.
    counted: u64,
    /// `completion_tokens` of the usage-only chunk at the end.
    final_usage: Option<u64>,
    prompt_tokens: Option<u64>,
}

impl Counter {
    /// The tokens chunk `v` carries.
    fn tokens_in(&mut self, v: &Value) -> u64 {
        let usage = v.get("usage").filter(|u| u.is_object());
        let completion = usage
            .and_then(|u| u.get("completion_tokens"))
            .and_then(Value::as_u64);
        if let Some(p) = usage
            .and_then(|u| u.get("prompt_tokens"))
            .and_then(Value::as_u64)
        {
            self.prompt_tokens = Some(p);
        }
        let choices = v
            .get("choices")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if choices.is_empty() {
            // The usage chunk after the last token: a total, not new tokens.
            if completion.is_some() {
                self.final_usage = completion;
            }
            return 0;
        }
        let n = match completion {
            Some(total) => {
                let n = total.saturating_sub(self.usage_seen);
                self.usage_seen = self.usage_seen.max(total);
                n
            }
            None => choices.iter().filter(|c| carries_output(c)).count() as u64,
        };
        self.counted += n;
        n
    }
}

/// Whether a choice of a chunk carries generated output (completions' `text`, chat's
/// `delta.content`, reasoning or tool calls); chat's first chunk (just the role) does not.
fn carries_output(choice: &Value) -> bool {
    let non_empty = |v: Option<&Value>| match v {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        _ => false,
    };
    let delta = choice.get("delta");
    non_empty(choice.get("text"))
        || non_empty(delta.and_then(|d| d.get("content")))
        || non_empty(delta.and_then(|d| d.get("reasoning_content")))
        || non_empty(delta.and_then(|d| d.get("reasoning")))
        || non_empty(delta.and_then(|d| d.get("tool_calls")))
}
