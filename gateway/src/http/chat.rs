//! `POST /v1/chat/completions`: messages (and tools) through the model's chat template, the
//! reply split into `reasoning_content`, `content` and `tool_calls`, as one response or as a
//! stream of `chat.completion.chunk`s.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use myriad_engine_api::FinishReason;

use super::chat_request::{ChatRequest, Prompt, render_prompt};
use super::error::ApiError;
use super::generation::{Finish, Generation, Step};
use super::load;
use super::openai::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion, ChatDelta, ChatLogprobs, ChatMessage,
    ChatTokenLogprob, FunctionOut, ToolCallDelta, ToolCallOut, Usage, random_id, unix_now,
};
use super::params::{Common, Fields};
use super::reasoning::ReasoningParser;
use super::sse::{ChunkSink, SseStream};
use super::state::{GatewayState, blocking};
use super::tools::{ToolCall, ToolParser};

/// `POST /v1/chat/completions`.
pub(crate) async fn handle(
    State(state): State<Arc<GatewayState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match run(state, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn run(
    state: Arc<GatewayState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| ApiError::from_body_rejection(r, state.config().max_body_bytes))?;
    let req = ChatRequest::parse(&Fields::parse(&body)?, &state)?;
    // Rendering and tokenising a long conversation is CPU work: keep it off the async workers.
    let (req, prompt) = {
        let state = Arc::clone(&state);
        blocking(move || render_prompt(&state, &req).map(|p| (req, p))).await??
    };
    let context = state.engine().max_context();
    let max_tokens = req.common.budget(
        prompt.ids.len(),
        context,
        state.config().default_max_tokens,
        "messages",
    )?;
    let requests: Vec<_> = req
        .common
        .requests(&prompt.ids, max_tokens, req.logprobs, false)
        .collect();
    let generation = Generation::submit(Arc::clone(&state), requests, &req.common.output_rules())?;
    let path = generation.path();
    state.metrics().prompt_tokens(prompt.ids.len());

    let out = Output {
        state: Arc::clone(&state),
        id: random_id("chatcmpl-", 32),
        created: unix_now(),
        choices: (0..req.common.n)
            .map(|_| ChoiceOutput::new(&state, &req, &prompt))
            .collect(),
        logprobs: req.logprobs.is_some(),
        prompt_tokens: prompt.ids.len(),
        req: req.common,
    };
    if out.req.stream {
        let first = (0..out.choices.len())
            .map(|i| {
                out.chunk(
                    vec![ChatChunkChoice {
                        index: i,
                        delta: ChatDelta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                            ..Default::default()
                        },
                        logprobs: None,
                        finish_reason: None,
                        stop_reason: None,
                    }],
                    out.req.chunk_usage(out.prompt_tokens, 0),
                )
            })
            .collect();
        let keep_alive = state.config().keep_alive;
        let response = SseStream::new(generation, out, first).into_response(keep_alive);
        return Ok(load::with_path(response, path));
    }
    collect(generation, out)
        .await
        .map(|r| load::with_path(r, path))
}

/// One choice's output so far.
struct ChoiceOutput {
    reasoning: Option<ReasoningParser>,
    tools: Option<ToolParser>,
    /// Tool calls emitted so far (the next call's index).
    calls: usize,
    /// Log-probabilities not yet sent (stream) or all of them (full response).
    logprobs: Vec<ChatTokenLogprob>,
    completion_tokens: usize,
    // Full response only:
    reasoning_text: String,
    content: String,
    tool_calls: Vec<ToolCallOut>,
    finish: Option<Finish>,
}

/// Text of one step, split.
#[derive(Default)]
struct Pieces {
    reasoning: String,
    content: String,
    calls: Vec<ToolCall>,
}

impl Pieces {
    fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.calls.is_empty()
    }

    fn append(&mut self, other: Pieces) {
        self.reasoning.push_str(&other.reasoning);
        self.content.push_str(&other.content);
        self.calls.extend(other.calls);
    }
}

impl ChoiceOutput {
    fn new(state: &GatewayState, req: &ChatRequest, prompt: &Prompt) -> Self {
        Self::with_parsers(
            state
                .config()
                .reasoning
                .then(|| ReasoningParser::new(prompt.in_reasoning)),
            req.tools
                .clone()
                .filter(|_| state.config().tool_calls)
                .map(ToolParser::new),
        )
    }

    fn with_parsers(reasoning: Option<ReasoningParser>, tools: Option<ToolParser>) -> Self {
        ChoiceOutput {
            reasoning,
            tools,
            calls: 0,
            logprobs: Vec::new(),
            completion_tokens: 0,
            reasoning_text: String::new(),
            content: String::new(),
            tool_calls: Vec::new(),
            finish: None,
        }
    }

    fn push(&mut self, text: &str) -> Pieces {
        let (reasoning, content) = match &mut self.reasoning {
            Some(p) => {
                let s = p.push(text);
                (s.reasoning, s.content)
            }
            None => (String::new(), text.to_string()),
        };
        self.content_pieces(reasoning, &content, false)
    }

    /// The end of the output: `tail` and everything the parsers still hold.
    fn finish(&mut self, tail: &str) -> Pieces {
        let mut pieces = self.push(tail);
        let (reasoning, content) = match &mut self.reasoning {
            Some(p) => {
                let s = p.finish();
                (s.reasoning, s.content)
            }
            None => (String::new(), String::new()),
        };
        pieces.append(self.content_pieces(reasoning, &content, true));
        pieces
    }

    fn content_pieces(&mut self, reasoning: String, content: &str, last: bool) -> Pieces {
        let Some(tools) = &mut self.tools else {
            return Pieces {
                reasoning,
                content: content.to_string(),
                calls: Vec::new(),
            };
        };
        let mut delta = tools.push(content);
        if last {
            let rest = tools.finish();
            delta.content.push_str(&rest.content);
            delta.calls.extend(rest.calls);
        }
        Pieces {
            reasoning,
            content: delta.content,
            calls: delta.calls,
        }
    }

    fn finish_reason(&self, reason: FinishReason) -> &'static str {
        match reason {
            FinishReason::Stop if self.calls > 0 || !self.tool_calls.is_empty() => "tool_calls",
            other => other.as_str(),
        }
    }
}

fn tool_call_out(call: ToolCall) -> ToolCallOut {
    ToolCallOut {
        id: random_id("call_", 24),
        kind: "function",
        function: FunctionOut {
            name: call.name,
            arguments: call.arguments,
        },
    }
}

/// Everything a response (streamed or not) is built from.
struct Output {
    state: Arc<GatewayState>,
    req: Common,
    id: String,
    created: u64,
    choices: Vec<ChoiceOutput>,
    logprobs: bool,
    prompt_tokens: usize,
}

impl Output {
    fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.completion_tokens).sum()
    }

    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: super::openai::ChunkUsage) -> String {
        let chunk = ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.req.model.clone(),
            choices,
            usage,
        };
        serde_json::to_string(&chunk).unwrap_or_default()
    }

    /// Records a token of choice `i`; returns its text pieces.
    fn token(
        &mut self,
        i: usize,
        text: &str,
        logprobs: Option<&myriad_engine_api::PositionLogprobs>,
    ) -> Pieces {
        if self.logprobs
            && let Some(lp) = logprobs
        {
            let entry = self
                .state
                .renderer(self.req.return_tokens_as_token_ids)
                .chat(lp);
            self.choices[i].logprobs.push(entry);
        }
        self.choices[i].completion_tokens += 1;
        self.choices[i].push(text)
    }

    fn delta_chunk(&mut self, i: usize, pieces: Pieces) -> String {
        let choice = &mut self.choices[i];
        let mut tool_calls = Vec::with_capacity(pieces.calls.len());
        for call in pieces.calls {
            let out = tool_call_out(call);
            tool_calls.push(ToolCallDelta {
                index: choice.calls,
                id: out.id,
                kind: out.kind,
                function: out.function,
            });
            choice.calls += 1;
        }
        let logprobs = self.logprobs.then(|| ChatLogprobs {
            content: std::mem::take(&mut choice.logprobs),
        });
        let delta = ChatDelta {
            role: None,
            content: Some(pieces.content).filter(|c| !c.is_empty()),
            reasoning_content: Some(pieces.reasoning).filter(|r| !r.is_empty()),
            tool_calls,
        };
        let usage = self
            .req
            .chunk_usage(self.prompt_tokens, self.completion_tokens());
        self.chunk(
            vec![ChatChunkChoice {
                index: i,
                delta,
                logprobs,
                finish_reason: None,
                stop_reason: None,
            }],
            usage,
        )
    }
}

impl ChunkSink for Output {
    fn steps(&mut self, i: usize, steps: Vec<Step>, out: &mut Vec<String>) {
        for step in steps {
            match step {
                Step::PromptLogprobs(_) | Step::Failed(_) => {}
                Step::Token { text, logprobs, .. } => {
                    let pieces = self.token(i, &text, logprobs.as_ref());
                    if !pieces.is_empty() {
                        out.push(self.delta_chunk(i, pieces));
                    }
                }
                Step::Finished(finish) => {
                    self.choices[i].completion_tokens = finish.completion_tokens;
                    let pieces = self.choices[i].finish(&finish.tail);
                    if !pieces.is_empty() {
                        out.push(self.delta_chunk(i, pieces));
                    }
                    let choice = &mut self.choices[i];
                    let logprobs =
                        (self.logprobs && !choice.logprobs.is_empty()).then(|| ChatLogprobs {
                            content: std::mem::take(&mut choice.logprobs),
                        });
                    let finish_reason = choice.finish_reason(finish.reason);
                    let usage = self
                        .req
                        .chunk_usage(self.prompt_tokens, self.completion_tokens());
                    out.push(self.chunk(
                        vec![ChatChunkChoice {
                            index: i,
                            delta: ChatDelta::default(),
                            logprobs,
                            finish_reason: Some(finish_reason),
                            stop_reason: finish.stop_reason,
                        }],
                        usage,
                    ));
                }
            }
        }
    }

    fn end(&mut self, out: &mut Vec<String>) {
        if self.req.include_usage {
            let usage = Usage::new(self.prompt_tokens, self.completion_tokens());
            out.push(self.chunk(Vec::new(), Some(Some(usage))));
        }
    }
}

/// The full (non-streaming) response.
async fn collect(mut generation: Generation, mut out: Output) -> Result<Response, ApiError> {
    while let Some((i, steps)) = generation.next().await {
        for step in steps {
            match step {
                Step::PromptLogprobs(_) => {}
                Step::Failed(error) => return Err(error),
                Step::Token { text, logprobs, .. } => {
                    let pieces = out.token(i, &text, logprobs.as_ref());
                    absorb(&mut out.choices[i], pieces);
                }
                Step::Finished(finish) => {
                    let choice = &mut out.choices[i];
                    choice.completion_tokens = finish.completion_tokens;
                    let pieces = choice.finish(&finish.tail);
                    absorb(choice, pieces);
                    choice.finish = Some(finish);
                }
            }
        }
    }
    let usage = Usage::new(out.prompt_tokens, out.completion_tokens());
    let logprobs = out.logprobs;
    let choices = out
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let finish_reason = c.finish.as_ref().map(|f| c.finish_reason(f.reason));
            let stop_reason = c.finish.and_then(|f| f.stop_reason);
            let has_other = !c.tool_calls.is_empty() || !c.reasoning_text.is_empty();
            ChatChoice {
                index,
                message: ChatMessage {
                    role: "assistant",
                    content: Some(c.content).filter(|t| !t.is_empty() || !has_other),
                    reasoning_content: Some(c.reasoning_text).filter(|r| !r.is_empty()),
                    tool_calls: c.tool_calls,
                },
                logprobs: logprobs.then_some(ChatLogprobs {
                    content: c.logprobs,
                }),
                finish_reason,
                stop_reason,
            }
        })
        .collect();
    Ok(Json(ChatCompletion {
        id: out.id,
        object: "chat.completion",
        created: out.created,
        model: out.req.model,
        choices,
        usage,
    })
    .into_response())
}

fn absorb(choice: &mut ChoiceOutput, pieces: Pieces) {
    choice.reasoning_text.push_str(&pieces.reasoning);
    choice.content.push_str(&pieces.content);
    choice
        .tool_calls
        .extend(pieces.calls.into_iter().map(tool_call_out));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `text` through a fresh choice, cut at `cuts`; returns (reasoning, content, calls).
    fn split(in_reasoning: bool, text: &str, cuts: &[usize]) -> (String, String, Vec<ToolCall>) {
        let mut choice = ChoiceOutput::with_parsers(
            Some(ReasoningParser::new(in_reasoning)),
            Some(ToolParser::new(Vec::new())),
        );
        let mut all = Pieces::default();
        let mut start = 0;
        for &cut in cuts.iter().chain([text.len()].iter()) {
            all.append(choice.push(&text[start..cut]));
            start = cut;
        }
        all.append(choice.finish(""));
        (all.reasoning, all.content, all.calls)
    }

    #[test]
    fn any_split_of_the_output_gives_the_same_parts() {
        let cases = [
            (
                false,
                "<think>\nPlan: call it.\n</think>\n\nSure.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>",
            ),
            (
                true,
                "Hmm, <tool_call> inside reasoning is text.\n</think>\n\nDone <b>.",
            ),
            (false, "No tags at all, just an answer."),
        ];
        for (in_reasoning, text) in cases {
            let whole = split(in_reasoning, text, &[]);
            for a in 0..=text.len() {
                for b in a..=text.len() {
                    if !text.is_char_boundary(a) || !text.is_char_boundary(b) {
                        continue;
                    }
                    assert_eq!(
                        split(in_reasoning, text, &[a, b]),
                        whole,
                        "cuts {a} {b} of {text:?}"
                    );
                }
            }
        }
        let (reasoning, content, calls) = split(false, cases[0].1, &[]);
        assert_eq!(reasoning, "Plan: call it.");
        assert_eq!(content, "Sure.\n");
        assert_eq!(
            calls,
            [ToolCall {
                name: "f".into(),
                arguments: r#"{"a":1}"#.into()
            }]
        );
        let (reasoning, content, calls) = split(true, cases[1].1, &[]);
        assert_eq!(reasoning, "Hmm, <tool_call> inside reasoning is text.");
        assert_eq!(content, "Done <b>.");
        assert!(calls.is_empty());
    }
}
