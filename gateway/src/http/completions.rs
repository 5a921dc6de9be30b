//! `POST /v1/completions`: raw prompts (a string, a list of strings, a list of token ids, or a
//! list of those), `echo`, the legacy log-probability format, as one response or as a stream
//! of `text_completion` chunks. Choice `p * n + j` is sample j of prompt p, as OpenAI numbers
//! them.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use myriad_engine_api::PositionLogprobs;
use serde_json::Value;

use super::error::ApiError;
use super::generation::{Generation, Step};
use super::load;
use super::openai::{
    ChunkUsage, Completion, CompletionChoice, CompletionChunk, CompletionLogprobs, Usage,
    random_id, unix_now,
};
use super::params::{Common, Fields, MaxTokens, token_id, type_error};
use super::sse::{ChunkSink, SseStream};
use super::state::{GatewayState, blocking};

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: usize = 16;

/// A prompt as given.
enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// A prompt ready for the engine.
struct Prompt {
    ids: Vec<u32>,
    /// What `echo` prepends: the prompt string as given, or the decoded token ids.
    text: String,
}

fn parse_prompts(f: &Fields, state: &GatewayState) -> Result<Vec<PromptInput>, ApiError> {
    let invalid = |v: &Value| {
        type_error(
            "prompt",
            "a string, a list of strings, a list of token ids or a list of token id lists",
            v,
        )
    };
    let prompts = match f.get("prompt") {
        None => return Err(ApiError::invalid_param("prompt", "`prompt` is required.")),
        Some(Value::String(s)) => vec![PromptInput::Text(s.clone())],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid_param(
                "prompt",
                "`prompt` must not be empty.",
            ));
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::Number(_) => {
                let ids = items
                    .iter()
                    .map(|v| token_id(state, "prompt", v))
                    .collect::<Result<_, _>>()?;
                vec![PromptInput::Ids(ids)]
            }
            Value::String(_) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(PromptInput::Text(s.clone())),
                    other => Err(invalid(other)),
                })
                .collect::<Result<_, _>>()?,
            Value::Array(_) => items
                .iter()
                .map(|v| match v {
                    Value::Array(ids) => Ok(PromptInput::Ids(
                        ids.iter()
                            .map(|v| token_id(state, "prompt", v))
                            .collect::<Result<_, _>>()?,
                    )),
                    other => Err(invalid(other)),
                })
                .collect::<Result<_, _>>()?,
            other => return Err(invalid(other)),
        },
        Some(other) => return Err(invalid(other)),
    };
    Ok(prompts)
}

fn prepare(state: &GatewayState, inputs: Vec<PromptInput>) -> Result<Vec<Prompt>, ApiError> {
    inputs
        .into_iter()
        .map(|input| {
            let prompt = match input {
                PromptInput::Text(text) => Prompt {
                    ids: state
                        .tokenizer()
                        .encode(&text)
                        .map_err(|e| ApiError::invalid_param("prompt", e.to_string()))?,
                    text,
                },
                PromptInput::Ids(ids) => Prompt {
                    text: state
                        .tokenizer()
                        .decode(&ids, false)
                        .map_err(|e| ApiError::invalid_param("prompt", e.to_string()))?,
                    ids,
                },
            };
            if prompt.ids.is_empty() {
                return Err(ApiError::invalid_param("prompt", "The prompt is empty."));
            }
            Ok(prompt)
        })
        .collect()
}

/// `POST /v1/completions`.
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
    let f = Fields::parse(&body)?;
    let common = Common::parse(
        &f,
        &state,
        MaxTokens {
            fields: &["max_tokens"],
            min: 0,
        },
    )?;
    let echo = f.bool("echo")?.unwrap_or(false);
    let logprobs = f.usize("logprobs")?;
    if let Some(k) = logprobs
        && k > state.config().max_logprobs
    {
        return Err(ApiError::invalid_param(
            "logprobs",
            format!(
                "`logprobs` must be at most {}, got {k}.",
                state.config().max_logprobs
            ),
        ));
    }
    if f.str("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param(
            "suffix",
            "`suffix` is not supported.",
        ));
    }
    if let Some(best_of) = f.usize("best_of")?
        && best_of != common.n
    {
        return Err(ApiError::invalid_param(
            "best_of",
            "`best_of` other than `n` is not supported.",
        ));
    }
    let inputs = parse_prompts(&f, &state)?;
    let prompts = {
        let state = Arc::clone(&state);
        blocking(move || prepare(&state, inputs)).await??
    };

    let context = state.engine().max_context();
    let mut requests = Vec::with_capacity(prompts.len() * common.n);
    for prompt in &prompts {
        let max_tokens = common.budget(
            prompt.ids.len(),
            context,
            Some(DEFAULT_MAX_TOKENS),
            "prompt",
        )?;
        requests.extend(common.requests(&prompt.ids, max_tokens, logprobs, echo));
    }
    let generation = Generation::submit(Arc::clone(&state), requests, &common.output_rules())?;
    let path = generation.path();
    let prompt_tokens: usize = prompts.iter().map(|p| p.ids.len()).sum();
    state.metrics().prompt_tokens(prompt_tokens);

    let n = common.n;
    let out = Output {
        choices: (0..prompts.len() * n)
            .map(|i| ChoiceOutput {
                prompt: i / n,
                echoed: !echo,
                offset: 0,
                text: String::new(),
                logprobs: CompletionLogprobs::default(),
                completion_tokens: 0,
                finish: None,
            })
            .collect(),
        state: Arc::clone(&state),
        id: random_id("cmpl-", 32),
        created: unix_now(),
        logprobs: logprobs.is_some(),
        prompts,
        prompt_tokens,
        req: common,
    };
    if out.req.stream {
        let keep_alive = state.config().keep_alive;
        let response = SseStream::new(generation, out, Vec::new()).into_response(keep_alive);
        return Ok(load::with_path(response, path));
    }
    collect(generation, out)
        .await
        .map(|r| load::with_path(r, path))
}

struct ChoiceOutput {
    /// Index into `Output::prompts`.
    prompt: usize,
    /// The echo of the prompt was emitted (always true without `echo`).
    echoed: bool,
    /// Characters of text so far (for `text_offset`).
    offset: usize,
    // Full response only:
    text: String,
    logprobs: CompletionLogprobs,
    completion_tokens: usize,
    finish: Option<(&'static str, Option<Value>)>,
}

struct Output {
    state: Arc<GatewayState>,
    req: Common,
    id: String,
    created: u64,
    prompts: Vec<Prompt>,
    choices: Vec<ChoiceOutput>,
    logprobs: bool,
    prompt_tokens: usize,
}

/// What one step adds to a choice.
struct Piece {
    text: String,
    logprobs: CompletionLogprobs,
    finish: Option<(&'static str, Option<Value>)>,
}

impl Output {
    fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.completion_tokens).sum()
    }

    /// Turns the steps of choice `i` into pieces (the echo first, when due).
    fn pieces(&mut self, i: usize, steps: Vec<Step>) -> Vec<Piece> {
        let mut pieces = Vec::new();
        for step in steps {
            if !self.choices[i].echoed {
                self.choices[i].echoed = true;
                let prompt_lps = match &step {
                    Step::PromptLogprobs(v) => v.as_slice(),
                    _ => &[],
                };
                pieces.push(self.echo(i, prompt_lps));
            }
            match step {
                Step::PromptLogprobs(_) | Step::Failed(_) => {}
                Step::Token { id, text, logprobs } => {
                    self.choices[i].completion_tokens += 1;
                    let mut lps = CompletionLogprobs::default();
                    if self.logprobs {
                        let renderer = self.state.renderer(self.req.return_tokens_as_token_ids);
                        let offset = &mut self.choices[i].offset;
                        renderer.completion(&mut lps, offset, id, logprobs.as_ref());
                    }
                    pieces.push(Piece {
                        text,
                        logprobs: lps,
                        finish: None,
                    });
                }
                Step::Finished(finish) => {
                    self.choices[i].completion_tokens = finish.completion_tokens;
                    pieces.push(Piece {
                        text: finish.tail,
                        logprobs: CompletionLogprobs::default(),
                        finish: Some((finish.reason.as_str(), finish.stop_reason)),
                    });
                }
            }
        }
        pieces
    }

    /// The prompt's text (and its positions' log-probabilities, the first one null).
    fn echo(&mut self, i: usize, prompt_lps: &[Option<PositionLogprobs>]) -> Piece {
        let prompt = &self.prompts[self.choices[i].prompt];
        let mut lps = CompletionLogprobs::default();
        if self.logprobs {
            let renderer = self.state.renderer(self.req.return_tokens_as_token_ids);
            let mut offset = 0;
            for (pos, &id) in prompt.ids.iter().enumerate() {
                let lp = prompt_lps.get(pos).and_then(Option::as_ref);
                renderer.completion(&mut lps, &mut offset, id, lp);
            }
            self.choices[i].offset = offset;
        }
        Piece {
            text: prompt.text.clone(),
            logprobs: lps,
            finish: None,
        }
    }

    fn chunk(&self, i: usize, piece: Piece, usage: ChunkUsage) -> String {
        let chunk = CompletionChunk {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.req.model.clone(),
            choices: vec![CompletionChoice {
                index: i,
                text: piece.text,
                logprobs: (self.logprobs && !piece.logprobs.is_empty()).then_some(piece.logprobs),
                finish_reason: piece.finish.as_ref().map(|f| f.0),
                stop_reason: piece.finish.and_then(|f| f.1),
            }],
            usage,
        };
        serde_json::to_string(&chunk).unwrap_or_default()
    }
}

impl ChunkSink for Output {
    fn steps(&mut self, i: usize, steps: Vec<Step>, out: &mut Vec<String>) {
        for piece in self.pieces(i, steps) {
            if piece.text.is_empty() && piece.logprobs.is_empty() && piece.finish.is_none() {
                continue;
            }
            let usage = self
                .req
                .chunk_usage(self.prompt_tokens, self.completion_tokens());
            out.push(self.chunk(i, piece, usage));
        }
    }

    fn end(&mut self, out: &mut Vec<String>) {
        if self.req.include_usage {
            let chunk = CompletionChunk {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.req.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(Usage::new(
                    self.prompt_tokens,
                    self.completion_tokens(),
                ))),
            };
            out.push(serde_json::to_string(&chunk).unwrap_or_default());
        }
    }
}

async fn collect(mut generation: Generation, mut out: Output) -> Result<Response, ApiError> {
    while let Some((i, steps)) = generation.next().await {
        if let Some(Step::Failed(error)) = steps.iter().find(|s| matches!(s, Step::Failed(_))) {
            return Err(error.clone());
        }
        for piece in out.pieces(i, steps) {
            let choice = &mut out.choices[i];
            choice.text.push_str(&piece.text);
            choice.logprobs.extend(piece.logprobs);
            if piece.finish.is_some() {
                choice.finish = piece.finish;
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
            let (finish_reason, stop_reason) = match c.finish {
                Some((reason, stop)) => (Some(reason), stop),
                None => (None, None),
            };
            CompletionChoice {
                index,
                text: c.text,
                logprobs: logprobs.then_some(c.logprobs),
                finish_reason,
                stop_reason,
            }
        })
        .collect();
    Ok(Json(Completion {
        id: out.id,
        object: "text_completion",
        created: out.created,
        model: out.req.model,
        choices,
        usage,
    })
    .into_response())
}
