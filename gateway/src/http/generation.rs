//! One request's sequences in flight: submits them to the engine ([`Generate`]), turns each
//! sequence's events into text (incremental detokenisation, then stop strings) and reports
//! finish reasons and token counts. Chat and completions, streaming or not, all read their
//! output from a [`Generation`], so they cut text and count tokens identically.
//!
//! A `Generation` owns the [`Submission`]s; dropping it (the handler's future or the SSE body,
//! when a client goes away) drops them, which cancels the sequences in the engine. A sequence
//! that hits a stop string is cancelled the same way, at once.
//!
//! [`Generate`]: myriad_engine_api::Generate

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use myriad_engine_api::{Event, FinishReason, PositionLogprobs, Request, ServePath, Submission};
use serde_json::Value;

use super::error::ApiError;
use super::state::GatewayState;
use super::stop::StopMatcher;
use crate::DecodeState;

/// How generated tokens become text; the same for every sequence of a request.
#[derive(Clone, Debug, Default)]
pub(crate) struct OutputRules {
    pub stop: Vec<String>,
    /// vLLM's `include_stop_str_in_output`.
    pub include_stop: bool,
    /// vLLM's `stop_token_ids`: such a token ends the sequence and its text is left out.
    pub stop_token_ids: Vec<u32>,
    pub skip_special_tokens: bool,
}

/// What one engine event meant for a sequence.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Step {
    /// Log-probabilities of the prompt positions (echo with logprobs), before any token.
    PromptLogprobs(Vec<Option<PositionLogprobs>>),
    /// One generated token and the text it released (empty while text is held back: an
    /// unfinished character, a possible stop string, a skipped special token).
    Token {
        id: u32,
        text: String,
        logprobs: Option<PositionLogprobs>,
    },
    /// The sequence ended; no step follows.
    Finished(Finish),
    /// The sequence failed; no step follows.
    /// The error the response ends with (a 500, or a 503 when no node could serve it).
    Failed(ApiError),
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Finish {
    /// Text that was still held back and is released by the end.
    pub tail: String,
    pub reason: FinishReason,
    /// vLLM's `stop_reason`: the stop string, or the stop token id, that ended the sequence.
    pub stop_reason: Option<Value>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

struct Sequence {
    /// `None` once finished (or cancelled).
    submission: Option<Submission>,
    decode: DecodeState,
    stop: StopMatcher,
    prompt_len: usize,
    generated: usize,
    last_token: Option<u32>,
    last_token_at: Option<Instant>,
}

/// The sequences of one request.
pub(crate) struct Generation {
    state: Arc<GatewayState>,
    sequences: Vec<Sequence>,
    stop_token_ids: Vec<u32>,
    started: Instant,
    /// Where the next poll starts, so that one busy sequence cannot starve the others.
    next: usize,
    live: usize,
    /// How the engine serves the request: disaggregated if any sequence is.
    path: ServePath,
}

impl Generation {
    /// Submits every request (in order: sequence i is `requests[i]`). If one is refused, those
    /// already submitted are cancelled and the refusal is returned.
    pub(crate) fn submit(
        state: Arc<GatewayState>,
        requests: Vec<Request>,
        rules: &OutputRules,
    ) -> Result<Self, ApiError> {
        let started = Instant::now();
        let mut sequences = Vec::with_capacity(requests.len());
        let mut path = ServePath::Direct;
        for request in requests {
            let prompt_len = request.prompt.len();
            // On error the `sequences` built so far are dropped, cancelling them.
            let submission = state.engine().submit(request)?;
            if submission.path == ServePath::Disaggregated {
                path = ServePath::Disaggregated;
            }
            sequences.push(Sequence {
                submission: Some(submission),
                decode: DecodeState::new(rules.skip_special_tokens),
                stop: StopMatcher::new(rules.stop.clone(), rules.include_stop),
                prompt_len,
                generated: 0,
                last_token: None,
                last_token_at: None,
            });
        }
        state.metrics().request_started();
        Ok(Generation {
            path,
            live: sequences.len(),
            state,
            sequences,
            stop_token_ids: rules.stop_token_ids.clone(),
            started,
            next: 0,
        })
    }

    /// The next steps of some sequence, as `(sequence index, steps)`; `None` when all ended.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<(usize, Vec<Step>)>> {
        if self.live == 0 {
            return Poll::Ready(None);
        }
        let n = self.sequences.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            let Some(submission) = self.sequences[i].submission.as_mut() else {
                continue;
            };
            if let Poll::Ready(event) = submission.events.poll_recv(cx) {
                self.next = (i + 1) % n;
                let steps = self.handle(i, event);
                return Poll::Ready(Some((i, steps)));
            }
        }
        Poll::Pending
    }

    /// How the engine serves the request (the `x-myriad-path` response header).
    pub(crate) fn path(&self) -> ServePath {
        self.path
    }

    pub(crate) async fn next(&mut self) -> Option<(usize, Vec<Step>)> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    fn handle(&mut self, i: usize, event: Option<Event>) -> Vec<Step> {
        let state = Arc::clone(&self.state);
        let tokenizer = state.tokenizer();
        let seq = &mut self.sequences[i];
        match event {
            Some(Event::PromptLogprobs(v)) => vec![Step::PromptLogprobs(v)],
            Some(Event::Token { id, logprobs }) => {
                let now = Instant::now();
                match seq.last_token_at {
                    None => state.metrics().time_to_first_token(now - self.started),
                    Some(last) => state.metrics().inter_token_latency(now - last),
                }
                state.metrics().generated_tokens(1);
                seq.last_token_at = Some(now);
                seq.last_token = Some(id);
                seq.generated += 1;
                let text = if self.stop_token_ids.contains(&id) {
                    String::new()
                } else {
                    match seq.decode.step(tokenizer, id) {
                        Ok(text) => text.unwrap_or_default(),
                        Err(e) => {
                            return self.fail(
                                i,
                                ApiError::internal(format!("cannot detokenize the output: {e}")),
                            );
                        }
                    }
                };
                let released = seq.stop.push(&text);
                let mut steps = vec![Step::Token {
                    id,
                    text: released.text,
                    logprobs,
                }];
                if let Some(stop) = released.stopped {
                    steps.push(Step::Finished(Finish {
                        tail: String::new(),
                        reason: FinishReason::Stop,
                        stop_reason: Some(Value::String(stop)),
                        prompt_tokens: seq.prompt_len,
                        completion_tokens: seq.generated,
                    }));
                    // Dropping the submission cancels the sequence in the engine.
                    self.close(i);
                }
                steps
            }
            Some(Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                let rest = match seq.decode.finish(tokenizer) {
                    Ok(rest) => rest,
                    Err(e) => {
                        return self.fail(
                            i,
                            ApiError::internal(format!("cannot detokenize the output: {e}")),
                        );
                    }
                };
                let released = seq.stop.push(&rest);
                let (tail, reason, stop_reason) = match released.stopped {
                    Some(stop) => (released.text, FinishReason::Stop, Some(Value::String(stop))),
                    None => {
                        let stop_token = seq.last_token.filter(|id| {
                            reason == FinishReason::Stop && self.stop_token_ids.contains(id)
                        });
                        (
                            released.text + &seq.stop.finish(),
                            reason,
                            stop_token.map(Value::from),
                        )
                    }
                };
                let steps = vec![Step::Finished(Finish {
                    tail,
                    reason,
                    stop_reason,
                    prompt_tokens,
                    completion_tokens,
                })];
                self.close(i);
                steps
            }
            Some(Event::Failed(message)) => self.fail(i, ApiError::internal(message)),
            Some(Event::Unavailable(message)) => self.fail(i, ApiError::unavailable(message)),
            None => self.fail(
                i,
                ApiError::internal("the engine dropped the request before it finished"),
            ),
        }
    }

    fn fail(&mut self, i: usize, error: ApiError) -> Vec<Step> {
        self.close(i);
        vec![Step::Failed(error)]
    }

    fn close(&mut self, i: usize) {
        if self.sequences[i].submission.take().is_some() {
            self.live -= 1;
            if self.live == 0 {
                self.state.metrics().request_latency(self.started.elapsed());
            }
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.state.metrics().request_ended();
    }
}
