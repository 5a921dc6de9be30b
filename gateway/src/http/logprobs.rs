//! Log-probabilities as the API reports them: the text and bytes of single tokens, the chat
//! format (`content: [{token, logprob, bytes, top_logprobs}]`) and the completions format
//! (`tokens`, `token_logprobs`, `top_logprobs` dicts, `text_offset`).
//!
//! A byte-level BPE token can hold part of a UTF-8 character, so its text is not always valid
//! on its own: `bytes` carries its exact bytes (recovered from the byte-level alphabet), and
//! `token` their lossy text, as OpenAI does. With vLLM's `return_tokens_as_token_ids` every
//! token is written `token_id:ID` instead, so clients can map it back without a tokenizer.
//! Log-probabilities of -inf are written as -9999.0 (as vLLM does), since JSON has no infinity.

use std::collections::HashMap;

use myriad_engine_api::PositionLogprobs;
use serde_json::{Map, Value};
use tokenizers::decoders::DecoderWrapper;

use super::openai::{ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs};
use crate::Tokenizer;

/// Token id → exact bytes, for any token of one tokenizer.
#[derive(Debug)]
pub(crate) struct TokenBytes {
    /// The inverse of GPT-2's byte → char table, when the tokenizer is byte-level.
    byte_level: Option<HashMap<char, u8>>,
    /// Added tokens (special or not) are stored as plain text, not in the byte alphabet.
    added: HashMap<u32, String>,
}

impl TokenBytes {
    pub(crate) fn new(tokenizer: &Tokenizer) -> Self {
        let byte_level = matches!(
            tokenizer.inner().get_decoder(),
            Some(DecoderWrapper::ByteLevel(_))
        )
        .then(byte_decoder);
        let added = tokenizer
            .inner()
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content))
            .collect();
        TokenBytes { byte_level, added }
    }

    pub(crate) fn bytes(&self, tokenizer: &Tokenizer, id: u32) -> Vec<u8> {
        if let Some(text) = self.added.get(&id) {
            return text.as_bytes().to_vec();
        }
        if let (Some(table), Some(piece)) = (&self.byte_level, tokenizer.id_to_token(id)) {
            let bytes: Option<Vec<u8>> = piece.chars().map(|c| table.get(&c).copied()).collect();
            if let Some(bytes) = bytes {
                return bytes;
            }
        }
        // Not byte-level (or an entry outside the alphabet): the decoder's text is the best
        // there is.
        tokenizer
            .decode(&[id], false)
            .unwrap_or_default()
            .into_bytes()
    }
}

/// GPT-2's `bytes_to_unicode`, inverted: printable bytes stand for themselves, the others
/// were shifted to U+0100 onwards in byte order.
fn byte_decoder() -> HashMap<char, u8> {
    let mut table = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        table.insert(c, b);
    }
    table
}

/// JSON has no -inf; vLLM writes -9999.0.
pub(crate) fn finite(logprob: f32) -> f32 {
    if logprob.is_nan() {
        -9999.0
    } else {
        logprob.max(-9999.0)
    }
}

/// A log-probability as a JSON number written as the f32 prints (`-1.5349771`, not the
/// widened `-1.5349770784378052`), so the dict values match `token_logprobs` digit for digit.
fn logprob_value(logprob: f32) -> Value {
    let short: f64 = finite(logprob).to_string().parse().unwrap_or(-9999.0);
    Value::from(short)
}

/// Renders tokens for one request.
pub(crate) struct Renderer<'a> {
    pub tokenizer: &'a Tokenizer,
    pub bytes: &'a TokenBytes,
    /// vLLM's `return_tokens_as_token_ids`.
    pub as_ids: bool,
}

impl<'a> Renderer<'a> {
    /// The token as text and its bytes.
    pub(crate) fn token(&self, id: u32) -> (String, Vec<u8>) {
        if self.as_ids {
            let text = format!("token_id:{id}");
            let bytes = text.clone().into_bytes();
            return (text, bytes);
        }
        let bytes = self.bytes.bytes(self.tokenizer, id);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// One generated position in the chat format.
    pub(crate) fn chat(&self, lp: &PositionLogprobs) -> ChatTokenLogprob {
        let (token, bytes) = self.token(lp.token_id);
        ChatTokenLogprob {
            token,
            logprob: finite(lp.logprob),
            bytes,
            top_logprobs: lp
                .top
                .iter()
                .map(|t| {
                    let (token, bytes) = self.token(t.token_id);
                    ChatTopLogprob {
                        token,
                        logprob: finite(t.logprob),
                        bytes,
                    }
                })
                .collect(),
        }
    }

    /// Appends one position in the completions format. `lp` is `None` for the first prompt
    /// token (nothing precedes it); `offset` is the running character offset in the text.
    pub(crate) fn completion(
        &self,
        out: &mut CompletionLogprobs,
        offset: &mut usize,
        token_id: u32,
        lp: Option<&PositionLogprobs>,
    ) {
        let (token, _) = self.token(token_id);
        out.text_offset.push(*offset);
        *offset += token.chars().count();
        match lp {
            None => {
                out.token_logprobs.push(None);
                out.top_logprobs.push(None);
            }
            Some(lp) => {
                out.token_logprobs.push(Some(finite(lp.logprob)));
                // The k most likely, then the chosen token when it is not among them (OpenAI:
                // "up to logprobs+1 elements").
                let mut top = Map::new();
                for t in &lp.top {
                    top.insert(self.token(t.token_id).0, logprob_value(t.logprob));
                }
                if !lp.top.iter().any(|t| t.token_id == lp.token_id) {
                    top.insert(token.clone(), logprob_value(lp.logprob));
                }
                out.top_logprobs.push(Some(top));
            }
        }
        out.tokens.push(token);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use myriad_engine_api::TokenLogprob;

    fn tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/qwen3_5_moe-tiny");
        Tokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn byte_table_covers_all_bytes() {
        let t = byte_decoder();
        assert_eq!(t.len(), 256);
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
        assert_eq!(t[&'a'], b'a');
    }

    #[test]
    fn token_bytes_reassemble_text() {
        let tok = tokenizer();
        let bytes = TokenBytes::new(&tok);
        let text = "Hello, wörld! 日本 <think>";
        let ids = tok.encode(text).unwrap();
        let all: Vec<u8> = ids.iter().flat_map(|&id| bytes.bytes(&tok, id)).collect();
        assert_eq!(String::from_utf8(all).unwrap(), text);
    }

    #[test]
    fn formats() {
        let tok = tokenizer();
        let bytes = TokenBytes::new(&tok);
        let ids = tok.encode("Hi there").unwrap();
        let r = Renderer {
            tokenizer: &tok,
            bytes: &bytes,
            as_ids: false,
        };
        let lp = PositionLogprobs {
            token_id: ids[1],
            logprob: -0.5,
            top: vec![
                TokenLogprob {
                    token_id: ids[0],
                    logprob: -0.25,
                },
                TokenLogprob {
                    token_id: ids[1],
                    logprob: f32::NEG_INFINITY,
                },
            ],
        };
        let chat = serde_json::to_value(r.chat(&lp)).unwrap();
        assert_eq!(chat["token"], r.token(ids[1]).0);
        assert_eq!(chat["logprob"], -0.5);
        assert_eq!(chat["top_logprobs"][1]["logprob"], -9999.0);
        assert_eq!(chat["top_logprobs"].as_array().unwrap().len(), 2);

        let mut out = CompletionLogprobs::default();
        let mut offset = 0;
        r.completion(&mut out, &mut offset, ids[0], None);
        let lp2 = PositionLogprobs {
            top: vec![TokenLogprob {
                token_id: ids[0],
                logprob: -0.1,
            }],
            ..lp
        };
        r.completion(&mut out, &mut offset, ids[1], Some(&lp2));
        let v = serde_json::to_value(&out).unwrap();
        assert_eq!(v["token_logprobs"][0], Value::Null);
        assert_eq!(v["top_logprobs"][0], Value::Null);
        assert_eq!(v["text_offset"][1], r.token(ids[0]).0.chars().count());
        assert_eq!(
            v["top_logprobs"][1][r.token(ids[0]).0.as_str()].to_string(),
            "-0.1"
        );
        // The chosen token is added to the top dict when it is not among the k.
        assert_eq!(v["top_logprobs"][1].as_object().unwrap().len(), 2);

        let r = Renderer { as_ids: true, ..r };
        assert_eq!(r.token(7).0, "token_id:7");
    }
}
