//! The response bodies of the OpenAI API (and vLLM's additions), as serde types: chat
//! completions and their stream chunks, text completions and theirs, usage, both log-probability
//! formats, tool calls and the model list. Field order follows OpenAI's responses.

use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub(crate) fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// `usage` on a stream chunk: absent without `include_usage`, else `null` except where the
/// counts are due (the last chunk, or every chunk with vLLM's `continuous_usage_stats`).
pub(crate) type ChunkUsage = Option<Option<Usage>>;

// ---- chat -------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub(crate) struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatChoice {
    pub index: usize,
    pub message: ChatMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// vLLM: the stop string or stop token id that ended the choice.
    pub stop_reason: Option<Value>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatMessage {
    pub role: &'static str,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct FunctionOut {
    pub name: String,
    /// A JSON text, as OpenAI sends it.
    pub arguments: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: ChunkUsage,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<Value>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

/// A complete call in one delta (the name and all the arguments at once).
#[derive(Debug, Serialize)]
pub(crate) struct ToolCallDelta {
    pub index: usize,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut,
}

// ---- completions --------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub(crate) struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub(crate) struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<Value>,
}

/// The legacy format: parallel lists, one entry per token; with `echo` the prompt's tokens
/// come first and the very first has no log-probability.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<Map<String, Value>>>,
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    pub(crate) fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub(crate) fn extend(&mut self, other: CompletionLogprobs) {
        self.tokens.extend(other.tokens);
        self.token_logprobs.extend(other.token_logprobs);
        self.top_logprobs.extend(other.top_logprobs);
        self.text_offset.extend(other.text_offset);
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct CompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: ChunkUsage,
}

// ---- models -------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub(crate) struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: String,
    /// vLLM: the context length.
    pub max_model_len: usize,
}

/// Seconds since the Unix epoch, for `created`.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random identifier such as `chatcmpl-3f2a…`: `hex` random hex digits after `prefix`.
/// Drawn from the standard library's randomly keyed hasher, so no RNG crate is needed.
pub(crate) fn random_id(prefix: &str, hex: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut id = String::with_capacity(prefix.len() + hex);
    id.push_str(prefix);
    while id.len() < prefix.len() + hex {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        id.push_str(&format!("{:016x}", h.finish()));
    }
    id.truncate(prefix.len() + hex);
    id
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chunk_usage_is_absent_null_or_counts() {
        let chunk = |usage| ChatChunk {
            id: "x".into(),
            object: "chat.completion.chunk",
            created: 1,
            model: "m".into(),
            choices: vec![],
            usage,
        };
        let text = serde_json::to_string(&chunk(None)).unwrap();
        assert!(!text.contains("usage"));
        let text = serde_json::to_string(&chunk(Some(None))).unwrap();
        assert!(text.contains(r#""usage":null"#));
        let text = serde_json::to_string(&chunk(Some(Some(Usage::new(3, 4))))).unwrap();
        assert!(
            text.contains(r#""usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}"#)
        );
    }

    #[test]
    fn ids_are_random_hex() {
        let a = random_id("chatcmpl-", 32);
        let b = random_id("chatcmpl-", 32);
        assert_eq!(a.len(), 41);
        assert_ne!(a, b);
        assert!(a[9..].chars().all(|c| c.is_ascii_hexdigit()));
    }
}
