//! Request bodies: random prompts of a given length, reproducible from `--seed`.
//!
//! Completions prompts are lists of token ids, so their length is exact whatever the
//! tokenizer; chat prompts are random common words (about one token each in BPE vocabularies),
//! so their length is approximate and the report shows what the server counted.

use serde_json::{Value, json};

use crate::Endpoint;

/// splitmix64: tiny, fast and good enough to make prompts differ; not for cryptography.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for one `stream` of the run's `seed` (each request has its own stream, so
    /// request i's prompt does not depend on how many requests ran before it).
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut r = Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (the modulo bias is irrelevant for prompts); `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Words for chat prompts: short and common, so most are one token.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are",
    "as", "with", "his", "they", "at", "be", "this", "have", "from", "or", "one", "had", "by",
    "word", "but", "not", "what", "all", "were", "we", "when", "your", "can", "said", "there",
    "use", "an", "each", "which", "she", "do", "how", "their", "if", "will", "up", "other",
    "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make", "like",
    "him",
];

/// What a request asks for, before it is written as JSON.
#[derive(Debug, Clone)]
pub struct RequestShape {
    pub endpoint: Endpoint,
    pub model: String,
    pub prompt_len: usize,
    pub max_tokens: usize,
    /// Token ids of completions prompts are drawn from `0..vocab_size`.
    pub vocab_size: u32,
    pub seed: u64,
}

impl RequestShape {
    /// The JSON body of request `stream` (a streaming request that ignores EOS, so it makes
    /// exactly `max_tokens` tokens, with usage on every chunk so tokens are counted exactly).
    pub fn body(&self, stream: u64) -> Vec<u8> {
        let mut rng = Rng::new(self.seed, stream);
        let prompt = match self.endpoint {
            Endpoint::Completions => (
                "prompt",
                Value::from(
                    (0..self.prompt_len)
                        .map(|_| rng.below(u64::from(self.vocab_size)))
                        .collect::<Vec<u64>>(),
                ),
            ),
            Endpoint::Chat => {
                let words: Vec<&str> = (0..self.prompt_len)
                    .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
                    .collect();
                (
                    "messages",
                    json!([{"role": "user", "content": words.join(" ")}]),
                )
            }
        };
        let mut body = json!({
            "model": self.model,
            "max_tokens": self.max_tokens,
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true, "continuous_usage_stats": true},
            // OpenAI's seed is a signed 64-bit integer; the bits are what matter.
            "seed": self.seed.wrapping_add(stream) as i64,
        });
        if let Some(obj) = body.as_object_mut() {
            obj.insert(prompt.0.to_string(), prompt.1);
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }
}
