//! Reading request bodies: the JSON object, typed access to its fields with errors that name
//! the field (`param`), and the parameters chat and completions share (sampling, `n`, `stop`,
//! streaming options, vLLM's extensions).
//!
//! Fields are read one by one from a `serde_json` object rather than through a derived
//! struct: the API's unions (`stop` as string or list, `prompt` in four shapes, `tool_choice`
//! as string or object) and OpenAI's habit of sending `null` for "unset" are easier to get
//! exactly right by hand, and every error can say which field is wrong. Fields this server
//! does not know are ignored, as OpenAI clients send extras.

use axum::body::Bytes;
use myriad_engine_api::{Request, SamplingParams};
use serde_json::{Map, Value};

use super::error::ApiError;
use super::generation::OutputRules;
use super::openai::{ChunkUsage, Usage};
use super::state::GatewayState;

/// The top-level object of a request body.
pub(crate) struct Fields {
    map: Map<String, Value>,
}

impl Fields {
    /// Parses the body; anything but a JSON object is a 400.
    pub(crate) fn parse(body: &Bytes) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::invalid(format!(
                "We could not parse the JSON body of your request: {e}. The body must be a JSON object."
            ))
        })?;
        match value {
            Value::Object(map) => Ok(Fields { map }),
            _ => Err(ApiError::invalid("The request body must be a JSON object.")),
        }
    }

    /// The field's value; `null` counts as absent, as OpenAI treats it.
    pub(crate) fn get(&self, name: &str) -> Option<&Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    pub(crate) fn f64(&self, name: &str) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| type_error(name, "a number", v)),
        }
    }

    /// An integer; a float with no fractional part (`2.0`) is accepted, as pydantic does.
    pub(crate) fn i64(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => as_integer(v)
                .map(Some)
                .ok_or_else(|| type_error(name, "an integer", v)),
        }
    }

    /// A non-negative integer.
    pub(crate) fn usize(&self, name: &str) -> Result<Option<usize>, ApiError> {
        match self.i64(name)? {
            None => Ok(None),
            Some(n) => usize::try_from(n).map(Some).map_err(|_| {
                ApiError::invalid_param(name, format!("`{name}` must be ≥ 0, got {n}."))
            }),
        }
    }

    pub(crate) fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| type_error(name, "a boolean", v)),
        }
    }

    pub(crate) fn str(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| type_error(name, "a string", v)),
        }
    }

    pub(crate) fn object(&self, name: &str) -> Result<Option<&Map<String, Value>>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_object()
                .map(Some)
                .ok_or_else(|| type_error(name, "an object", v)),
        }
    }

    pub(crate) fn array(&self, name: &str) -> Result<Option<&Vec<Value>>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .map(Some)
                .ok_or_else(|| type_error(name, "an array", v)),
        }
    }
}

/// An integer-valued JSON number.
pub(crate) fn as_integer(v: &Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    let f = v.as_f64()?;
    // 2^63 is exactly representable; anything at or past it does not fit an i64.
    (f.fract() == 0.0 && f.abs() < 9.223_372_036_854_776e18).then_some(f as i64)
}

pub(crate) fn type_error(name: &str, expected: &str, got: &Value) -> ApiError {
    let kind = match got {
        Value::Null => "null".to_string(),
        Value::Bool(_) => "a boolean".to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(_) => "a string".to_string(),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    };
    ApiError::invalid_param(name, format!("`{name}` must be {expected}, got {kind}."))
}

/// What both endpoints accept beyond their prompt.
#[derive(Clone, Debug)]
pub(crate) struct Common {
    /// The model name to echo back in responses.
    pub model: String,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM: usage on every chunk.
    pub continuous_usage: bool,
    /// As given; `None` when the request did not say.
    pub max_tokens: Option<usize>,
    /// The sampling parameters of choice 0 (choice i adds i to the seed).
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub include_stop: bool,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    pub return_tokens_as_token_ids: bool,
}

/// Where `max_tokens` comes from and what it may be.
pub(crate) struct MaxTokens<'a> {
    /// Fields read in order; the first present wins (chat: `max_completion_tokens`, then the
    /// deprecated `max_tokens`).
    pub fields: &'a [&'a str],
    /// The smallest value allowed (completions allow 0 with `echo`, to score a prompt).
    pub min: usize,
}

impl Common {
    pub(crate) fn parse(
        f: &Fields,
        state: &GatewayState,
        max_tokens: MaxTokens<'_>,
    ) -> Result<Self, ApiError> {
        let config = state.config();
        let model = match f.str("model")? {
            None => config.model_name.clone(),
            Some(name) if config.serves(name) => name.to_string(),
            Some(name) => return Err(ApiError::model_not_found(name)),
        };

        let n = f.usize("n")?.unwrap_or(1);
        if n == 0 || n > config.max_n {
            return Err(ApiError::invalid_param(
                "n",
                format!("`n` must be between 1 and {}, got {n}.", config.max_n),
            ));
        }

        let stream = f.bool("stream")?.unwrap_or(false);
        let (mut include_usage, mut continuous_usage) = (false, false);
        if let Some(options) = f.object("stream_options")? {
            if !stream {
                return Err(ApiError::invalid_param(
                    "stream_options",
                    "`stream_options` is only allowed when `stream` is true.",
                ));
            }
            let opt = |name: &str| -> Result<bool, ApiError> {
                match options.get(name) {
                    None | Some(Value::Null) => Ok(false),
                    Some(Value::Bool(b)) => Ok(*b),
                    Some(v) => Err(type_error(
                        &format!("stream_options.{name}"),
                        "a boolean",
                        v,
                    )),
                }
            };
            include_usage = opt("include_usage")?;
            continuous_usage = opt("continuous_usage_stats")?;
        }

        let mut max = None;
        for name in max_tokens.fields {
            if let Some(v) = f.usize(name)? {
                if v < max_tokens.min {
                    return Err(ApiError::invalid_param(
                        name,
                        format!("`{name}` must be at least {}, got {v}.", max_tokens.min),
                    ));
                }
                max = Some(v);
                break;
            }
        }

        let temperature = f.f64("temperature")?.unwrap_or(1.0);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("`temperature` must be a number ≥ 0, got {temperature}."),
            ));
        }
        let top_p = f.f64("top_p")?.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid_param(
                "top_p",
                format!("`top_p` must be in (0, 1], got {top_p}."),
            ));
        }
        // vLLM: -1 (and 0) disable top-k.
        let top_k = match f.i64("top_k")? {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    format!("`top_k` must be -1 (disabled) or a positive integer, got {k}."),
                ));
            }
        };
        // OpenAI's seed is a signed 64-bit integer; its bits seed the generator.
        let seed = f.i64("seed")?.map(|s| s as u64);
        for name in ["presence_penalty", "frequency_penalty"] {
            if let Some(p) = f.f64(name)?
                && !(-2.0..=2.0).contains(&p)
            {
                return Err(ApiError::invalid_param(
                    name,
                    format!("`{name}` must be in [-2, 2], got {p}."),
                ));
            }
        }

        let stop = match f.get("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => {
                let mut stop = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s) => stop.push(s.clone()),
                        other => {
                            return Err(type_error("stop", "a string or a list of strings", other));
                        }
                    }
                }
                stop
            }
            Some(other) => return Err(type_error("stop", "a string or a list of strings", other)),
        };
        // An empty stop string would end every request before its first character.
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();

        let mut stop_token_ids = Vec::new();
        if let Some(ids) = f.array("stop_token_ids")? {
            for v in ids {
                stop_token_ids.push(token_id(state, "stop_token_ids", v)?);
            }
        }

        Ok(Common {
            model,
            n,
            stream,
            include_usage,
            continuous_usage,
            max_tokens: max,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k,
                seed,
            },
            stop,
            include_stop: f.bool("include_stop_str_in_output")?.unwrap_or(false),
            stop_token_ids,
            ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
            skip_special_tokens: f.bool("skip_special_tokens")?.unwrap_or(true),
            return_tokens_as_token_ids: f.bool("return_tokens_as_token_ids")?.unwrap_or(false),
        })
    }

    /// The sampling parameters of choice `i`: with a seed, choice i uses seed + i, so the
    /// choices differ from each other yet the request is reproducible.
    pub(crate) fn sampling_for(&self, i: usize) -> SamplingParams {
        SamplingParams {
            seed: self.sampling.seed.map(|s| s.wrapping_add(i as u64)),
            ..self.sampling.clone()
        }
    }

    /// The engine requests for one prompt: `n` of them, choice i seeded with seed + i.
    pub(crate) fn requests(
        &self,
        prompt: &[u32],
        max_tokens: usize,
        logprobs: Option<usize>,
        echo: bool,
    ) -> impl Iterator<Item = Request> + '_ {
        let prompt = prompt.to_vec();
        (0..self.n).map(move |i| Request {
            prompt: prompt.clone(),
            max_tokens,
            sampling: self.sampling_for(i),
            ignore_eos: self.ignore_eos,
            stop_token_ids: self.stop_token_ids.clone(),
            logprobs,
            echo,
        })
    }

    pub(crate) fn output_rules(&self) -> OutputRules {
        OutputRules {
            stop: self.stop.clone(),
            include_stop: self.include_stop,
            stop_token_ids: self.stop_token_ids.clone(),
            skip_special_tokens: self.skip_special_tokens,
        }
    }

    /// `usage` on ordinary stream chunks: absent, `null`, or the counts so far.
    pub(crate) fn chunk_usage(&self, prompt_tokens: usize, completion_tokens: usize) -> ChunkUsage {
        match (self.include_usage, self.continuous_usage) {
            (false, _) => None,
            (true, false) => Some(None),
            (true, true) => Some(Some(Usage::new(prompt_tokens, completion_tokens))),
        }
    }

    /// The completion budget for a prompt of `prompt_len` tokens, or the 400 vLLM gives when
    /// the context cannot hold it. `default` is used when the request named none (chat: the
    /// rest of the context; completions: 16), clipped to what the context leaves.
    pub(crate) fn budget(
        &self,
        prompt_len: usize,
        context: usize,
        default: Option<usize>,
        what: &str,
    ) -> Result<usize, ApiError> {
        let left = context.saturating_sub(prompt_len);
        match self.max_tokens {
            Some(max) if prompt_len + max > context => Err(ApiError::invalid(format!(
                "This model's maximum context length is {context} tokens. However, you requested \
                 {} tokens ({prompt_len} in the {what}, {max} in the completion). Please reduce \
                 the length of the {what} or completion.",
                prompt_len + max
            ))),
            Some(max) => Ok(max),
            None if left == 0 => Err(ApiError::invalid(format!(
                "This model's maximum context length is {context} tokens. However, your request \
                 has {prompt_len} input tokens. Please reduce the length of the {what}."
            ))),
            None => Ok(default.map_or(left, |d| d.min(left))),
        }
    }
}

/// A token id from the request, checked against the vocabulary.
pub(crate) fn token_id(state: &GatewayState, param: &str, v: &Value) -> Result<u32, ApiError> {
    let id = as_integer(v).ok_or_else(|| type_error(param, "a list of token ids", v))?;
    u32::try_from(id)
        .ok()
        .filter(|&id| state.tokenizer().id_to_token(id).is_some())
        .ok_or_else(|| {
            ApiError::invalid_param(
                param,
                format!(
                    "Token id {id} is out of vocabulary (size {}).",
                    state.tokenizer().vocab_size()
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fields(text: &str) -> Fields {
        Fields::parse(&Bytes::from(text.to_string())).unwrap()
    }

    #[test]
    fn typed_access_names_the_field() {
        let f = fields(r#"{"a": 2.0, "b": 2.5, "c": "x", "d": null, "e": -1}"#);
        assert_eq!(f.i64("a").unwrap(), Some(2));
        let e = f.i64("b").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("b"));
        assert!(f.f64("c").is_err());
        assert_eq!(f.f64("d").unwrap(), None);
        assert!(f.usize("e").is_err());
        assert!(Fields::parse(&Bytes::from_static(b"[1]")).is_err());
        assert!(Fields::parse(&Bytes::from_static(b"{")).is_err());
    }
}
