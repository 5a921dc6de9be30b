//! One generation request and what comes back for it, position by position.

/// One generation request.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (0: prompt only, e.g. for prompt log-probabilities).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep going through end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Extra token ids that end the sequence (kept in the output, as vLLM does).
    pub stop_token_ids: Vec<u32>,
    /// Report log-probabilities with this many top alternatives per position.
    pub logprobs: Option<usize>,
    /// Also report log-probabilities of the prompt tokens.
    pub echo: bool,
}

impl Request {
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Request {
            prompt,
            max_tokens,
            sampling: SamplingParams::greedy(),
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            logprobs: None,
            echo: false,
        }
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    /// An end-of-sequence or stop token.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The log-probability of the token at one position and the most likely alternatives there.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PositionLogprobs {
    pub token_id: u32,
    pub logprob: f32,
    pub top: Vec<TokenLogprob>,
}

/// How to pick the next token.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Seed of this request's generator (None: a fresh random seed).
    pub seed: Option<u64>,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }

    /// Checks the ranges; the message names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be a finite number ≥ 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// A token with its log-probability.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
}
