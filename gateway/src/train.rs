//! Training a Qwen-style tokenizer from the built-in corpus, for `myriad make-model`: a
//! random-weight model gets a working `tokenizer.json` / `tokenizer_config.json` with nothing
//! downloaded.
//!
//! The pipeline is the fixtures' (see `shared/fixtures/make_fixtures.py`): byte-level BPE with
//! an NFC normaliser, the Qwen split regex then ByteLevel (no prefix space, no regex), and a
//! ByteLevel decoder. All 256 byte symbols are in the initial alphabet, so any text encodes.
//! Regular tokens take ids `0..N`; the special tokens follow at `vocab_size - n ..`. The
//! output depends only on the spec: the same spec gives byte-identical files.

use crate::config::TOKENIZER_CONFIG_FILE;
use crate::corpus::training_corpus;
use crate::tokenizer::TOKENIZER_FILE;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use thiserror::Error;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::tokenizer::SplitDelimiterBehavior;

/// The chat template written into `tokenizer_config.json` (the fixtures' template: ChatML
/// turns, a tools block, `<tool_call>` JSON calls, `<tool_response>`, `reasoning_content` as
/// `<think>…</think>`, and an empty think block for `enable_thinking=false`).
pub const CHAT_TEMPLATE: &str = include_str!("chat_template.jinja");

/// Qwen2 / Qwen3 / Qwen3-Next pre-tokenizer split pattern.
const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5 extends the letter classes with combining marks.
const QWEN3_5_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Tokens the chat template and the config refer to by name.
const REQUIRED_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Byte-level BPE starts from one symbol per byte.
const BYTE_ALPHABET: usize = 256;

/// What to train.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerSpec {
    /// Total size, special tokens included (the model's `vocab_size`).
    pub vocab_size: usize,
    /// Special tokens in id order, placed at `vocab_size - n .. vocab_size`. Tokens written
    /// `<|...|>` are special (dropped by `skip_special_tokens`); others, like the tool and
    /// think tags, are added tokens that are never split but decode as text, as in Qwen3.
    pub specials: Vec<String>,
    pub model_max_length: usize,
    /// `Qwen2Tokenizer` (Qwen3-Next) or `Qwen3_5Tokenizer`; the latter also selects the
    /// Qwen3.5 split regex.
    pub tokenizer_class: String,
}

impl TokenizerSpec {
    /// The Qwen3-Next layout of the fixtures, with the family's special tokens
    /// (`myriad_model::presets::special_tokens`, the one source of them).
    pub fn qwen3_next(vocab_size: usize, specials: &[&str]) -> Self {
        TokenizerSpec {
            vocab_size,
            specials: specials.iter().map(|s| s.to_string()).collect(),
            model_max_length: 4096,
            tokenizer_class: "Qwen2Tokenizer".to_string(),
        }
    }

    /// The Qwen3.5-MoE layout of the fixtures, with the family's special tokens.
    pub fn qwen3_5_moe(vocab_size: usize, specials: &[&str]) -> Self {
        TokenizerSpec {
            vocab_size,
            specials: specials.iter().map(|s| s.to_string()).collect(),
            model_max_length: 4096,
            tokenizer_class: "Qwen3_5Tokenizer".to_string(),
        }
    }

    fn split_regex(&self) -> &'static str {
        if self.tokenizer_class == "Qwen3_5Tokenizer" {
            QWEN3_5_SPLIT_REGEX
        } else {
            QWEN2_SPLIT_REGEX
        }
    }
}

/// The trained tokenizer as file contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerFiles {
    pub tokenizer_json: String,
    pub tokenizer_config_json: String,
    /// Ids `0..regular_tokens` are learned BPE tokens. When the corpus ran out of merges
    /// before `vocab_size - n`, the ids up to the specials hold unreachable placeholders
    /// `<|unused_K|>` (so the specials keep their ids); they are not counted here.
    pub regular_tokens: usize,
}

impl TokenizerFiles {
    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (which must exist).
    pub fn write_to(&self, dir: &Path) -> Result<(), TrainError> {
        for (name, text) in [
            (TOKENIZER_FILE, &self.tokenizer_json),
            (TOKENIZER_CONFIG_FILE, &self.tokenizer_config_json),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|source| TrainError::Write { path, source })?;
        }
        Ok(())
    }
}

#[derive(Debug, Error)]
pub enum TrainError {
    #[error(
        "vocab_size {vocab_size} is too small: {specials} special tokens and the {BYTE_ALPHABET} byte tokens need at least {}",
        specials + BYTE_ALPHABET
    )]
    VocabTooSmall { vocab_size: usize, specials: usize },
    #[error(
        "the special tokens must include {0:?} (the chat template and tokenizer_config.json use it)"
    )]
    MissingSpecial(String),
    #[error("special token {0:?} is listed twice")]
    DuplicateSpecial(String),
    #[error("a special token is the empty string")]
    EmptySpecial,
    #[error("tokenizer training failed: {0}")]
    Tokenizers(String),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn tk_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Tokenizers(e.to_string())
}

/// Trains a byte-level BPE tokenizer for `spec` on the built-in corpus.
pub fn train_tokenizer(spec: &TokenizerSpec) -> Result<TokenizerFiles, TrainError> {
    validate(spec)?;
    let n_special = spec.specials.len();
    let n_regular = spec.vocab_size - n_special;

    let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
    tokenizer.with_normalizer(Some(NFC)).map_err(tk_err)?;
    let split = Split::new(
        SplitPattern::Regex(spec.split_regex().to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(tk_err)?;
    let byte_level = ByteLevel::default()
        .add_prefix_space(false)
        .trim_offsets(false)
        .use_regex(false);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(byte_level),
    ])));
    tokenizer.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
    tokenizer.with_decoder(Some(ByteLevel::default()));

    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(n_regular)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build()
        .into();
    let corpus = training_corpus(n_regular.saturating_sub(BYTE_ALPHABET));
    tokenizer
        .train(&mut trainer, corpus.iter())
        .map_err(tk_err)?;
    let regular_tokens = tokenizer.get_vocab_size(false);

    let doc: Value =
        serde_json::from_str(&tokenizer.to_string(false).map_err(tk_err)?).map_err(tk_err)?;
    let tokenizer_json = finish_tokenizer_json(doc, spec, regular_tokens)?;

    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config_json: tokenizer_config(spec, n_regular)?,
        regular_tokens,
    })
}

fn validate(spec: &TokenizerSpec) -> Result<(), TrainError> {
    let mut seen = HashSet::new();
    for special in &spec.specials {
        if special.is_empty() {
            return Err(TrainError::EmptySpecial);
        }
        if !seen.insert(special.as_str()) {
            return Err(TrainError::DuplicateSpecial(special.clone()));
        }
    }
    if let Some(missing) = REQUIRED_SPECIALS.iter().find(|s| !seen.contains(**s)) {
        return Err(TrainError::MissingSpecial(missing.to_string()));
    }
    if spec.vocab_size < spec.specials.len() + BYTE_ALPHABET {
        return Err(TrainError::VocabTooSmall {
            vocab_size: spec.vocab_size,
            specials: spec.specials.len(),
        });
    }
    Ok(())
}

/// Qwen's convention: `<|...|>` tokens are control tokens; tags like `<think>` are text.
fn is_special(token: &str) -> bool {
    token.starts_with("<|") && token.ends_with("|>")
}

/// Fills the vocabulary up to the specials, adds them with their ids, and checks the result.
fn finish_tokenizer_json(
    mut doc: Value,
    spec: &TokenizerSpec,
    regular_tokens: usize,
) -> Result<String, TrainError> {
    let first_special = spec.vocab_size - spec.specials.len();
    pad_vocab(&mut doc, regular_tokens, first_special)?;
    doc["added_tokens"] = Value::Array(
        spec.specials
            .iter()
            .enumerate()
            .map(|(i, content)| {
                json!({
                    "id": first_special + i,
                    "content": content,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": is_special(content),
                })
            })
            .collect(),
    );
    let tokenizer_json = serde_json::to_string_pretty(&doc).map_err(tk_err)?;
    check_ids(&tokenizer_json, spec)?;
    Ok(tokenizer_json)
}

/// `tokenizers` numbers added tokens right after the model's vocabulary whatever ids the file
/// gives, so a short vocabulary is filled up to `target` with placeholders that no merge
/// produces (and no text therefore encodes to).
fn pad_vocab(doc: &mut Value, regular: usize, target: usize) -> Result<(), TrainError> {
    let vocab = doc
        .pointer_mut("/model/vocab")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| TrainError::Tokenizers("serialized tokenizer has no model.vocab".into()))?;
    let mut next_name = 0usize;
    for id in regular..target {
        let name = loop {
            let name = format!("<|unused_{next_name}|>");
            next_name += 1;
            if !vocab.contains_key(&name) {
                break name;
            }
        };
        vocab.insert(name, json!(id));
    }
    Ok(())
}

/// Loads the result back and checks that every special token sits on its id.
fn check_ids(tokenizer_json: &str, spec: &TokenizerSpec) -> Result<(), TrainError> {
    let loaded = tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes()).map_err(tk_err)?;
    let first = spec.vocab_size - spec.specials.len();
    for (i, special) in spec.specials.iter().enumerate() {
        let id = loaded.token_to_id(special);
        if id != Some((first + i) as u32) {
            return Err(TrainError::Tokenizers(format!(
                "special token {special:?} landed on id {id:?}, not {}",
                first + i
            )));
        }
    }
    Ok(())
}

/// `tokenizer_config.json` laid out like the fixtures' (Python `json.dumps(indent=2)`).
fn tokenizer_config(spec: &TokenizerSpec, first_special: usize) -> Result<String, TrainError> {
    let mut added = serde_json::Map::new();
    for (i, content) in spec.specials.iter().enumerate() {
        added.insert(
            (first_special + i).to_string(),
            json!({
                "content": content,
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": is_special(content),
            }),
        );
    }
    let additional: Vec<&String> = spec
        .specials
        .iter()
        .filter(|s| is_special(s) && s.as_str() != "<|endoftext|>")
        .collect();
    let template = CHAT_TEMPLATE.strip_suffix('\n').unwrap_or(CHAT_TEMPLATE);
    let config = json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": added,
        "additional_special_tokens": additional,
        "bos_token": null,
        "chat_template": template,
        "clean_up_tokenization_spaces": false,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": spec.model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": false,
        "tokenizer_class": spec.tokenizer_class,
        "unk_token": null,
    });
    let mut text = serde_json::to_string_pretty(&config).map_err(tk_err)?;
    text.push('\n');
    Ok(text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Tokenizer;
    use myriad_model::Family;
    use myriad_model::presets::special_tokens;

    /// A corpus that runs out of merges leaves a gap that placeholders fill, so the specials
    /// keep their ids.
    #[test]
    fn short_vocabulary_is_padded_below_the_specials() {
        let vocab: tokenizers::models::bpe::Vocab = ByteLevel::alphabet()
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .unwrap();
        let tokenizer = tokenizers::Tokenizer::new(bpe);
        let doc: Value = serde_json::from_str(&tokenizer.to_string(false).unwrap()).unwrap();
        let specials = special_tokens(Family::Qwen3Next);
        let spec = TokenizerSpec::qwen3_next(300 + specials.len(), specials);
        let json = finish_tokenizer_json(doc, &spec, BYTE_ALPHABET).unwrap();
        let tok =
            Tokenizer::from_json(&json, Some(&tokenizer_config(&spec, 300).unwrap())).unwrap();
        assert_eq!(tok.vocab_size(), spec.vocab_size);
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(300));
        assert_eq!(tok.token_to_id("</think>"), Some(308));
        assert_eq!(tok.id_to_token(256).as_deref(), Some("<|unused_0|>"));
        assert_eq!(tok.id_to_token(299).as_deref(), Some("<|unused_43|>"));
        // Placeholders are unreachable: their text encodes byte by byte.
        assert!(
            tok.encode("<|unused_0|>")
                .unwrap()
                .iter()
                .all(|&id| id < 256)
        );
    }
}
