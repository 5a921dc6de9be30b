//! The model's tokenizer: `tokenizer.json` (a Hugging Face `tokenizers` pipeline) plus the
//! token names from `tokenizer_config.json`, with encode / decode as Qwen uses them (no BOS,
//! special-token text in the input recognised as the special token).

use crate::config::{ConfigError, TOKENIZER_CONFIG_FILE, TokenizerConfig};
use crate::decode_stream::DecodeStream;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use thiserror::Error;
use tokenizers::AddedToken;

/// The file name `tokenizers` and transformers use.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed tokenizer file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{}: {field} {token:?} is not in the vocabulary", path.display())]
    UnknownNamedToken {
        path: PathBuf,
        field: &'static str,
        token: String,
    },
    #[error(
        "{}: added token {token:?} has id {config_id} in added_tokens_decoder but {} in tokenizer.json",
        path.display(),
        tokenizer_id.map_or("none".to_string(), |id| id.to_string())
    )]
    AddedTokenMismatch {
        path: PathBuf,
        token: String,
        config_id: u32,
        tokenizer_id: Option<u32>,
    },
    #[error("token id {id} is not in the vocabulary (size {vocab_size})")]
    UnknownTokenId { id: u32, vocab_size: usize },
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error("cannot decode token ids: {0}")]
    Decode(String),
}

/// A loaded tokenizer. Cheap to share by reference; encoding and decoding take `&self`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    special_ids: HashSet<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eos_token", &self.eos_token)
            .field("eos_token_id", &self.eos_token_id)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`.
    ///
    /// Without a config there are no BOS / EOS / pad names (`eos_token_id()` is `None`).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join(TOKENIZER_FILE);
        let json = std::fs::read(&path).map_err(|source| TokenizerError::Read {
            path: path.clone(),
            source,
        })?;
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = if config_path.is_file() {
            Some(TokenizerConfig::from_file(&config_path)?)
        } else {
            None
        };
        Self::build(&json, &path, config.as_ref(), &config_path)
    }

    /// Builds a tokenizer from the texts of `tokenizer.json` and `tokenizer_config.json`
    /// (for example files not yet written to disk). Errors call them by their usual names.
    pub fn from_json(
        tokenizer_json: &str,
        tokenizer_config_json: Option<&str>,
    ) -> Result<Self, TokenizerError> {
        let config_path = Path::new(TOKENIZER_CONFIG_FILE);
        let config = tokenizer_config_json
            .map(|text| TokenizerConfig::parse(text, config_path))
            .transpose()?;
        Self::build(
            tokenizer_json.as_bytes(),
            Path::new(TOKENIZER_FILE),
            config.as_ref(),
            config_path,
        )
    }

    fn build(
        json: &[u8],
        path: &Path,
        config: Option<&TokenizerConfig>,
        config_path: &Path,
    ) -> Result<Self, TokenizerError> {
        let mut inner =
            tokenizers::Tokenizer::from_bytes(json).map_err(|e| TokenizerError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let default_config = TokenizerConfig::default();
        let config = config.unwrap_or(&default_config);

        // transformers adds tokens listed only in the config; they must land on the listed ids.
        for entry in &config.added_tokens {
            let mismatch = |tokenizer_id| TokenizerError::AddedTokenMismatch {
                path: config_path.to_path_buf(),
                token: entry.content.clone(),
                config_id: entry.id,
                tokenizer_id,
            };
            match inner.token_to_id(&entry.content) {
                Some(id) if id == entry.id => {}
                Some(id) => return Err(mismatch(Some(id))),
                None => {
                    let token =
                        AddedToken::from(entry.content.clone(), entry.special).normalized(false);
                    inner
                        .add_tokens([token])
                        .map_err(|e| TokenizerError::Parse {
                            path: config_path.to_path_buf(),
                            message: e.to_string(),
                        })?;
                    let id = inner.token_to_id(&entry.content);
                    if id != Some(entry.id) {
                        return Err(mismatch(id));
                    }
                }
            }
        }

        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&max| max as usize + 1);
        let special_ids = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, token)| token.special)
            .map(|(&id, _)| id)
            .collect();
        let lookup =
            |field: &'static str, token: &Option<String>| -> Result<Option<u32>, TokenizerError> {
                match token {
                    None => Ok(None),
                    Some(token) => inner.token_to_id(token).map(Some).ok_or_else(|| {
                        TokenizerError::UnknownNamedToken {
                            path: config_path.to_path_buf(),
                            field,
                            token: token.clone(),
                        }
                    }),
                }
            };
        let bos_token_id = lookup("bos_token", &config.bos_token)?;
        let eos_token_id = lookup("eos_token", &config.eos_token)?;
        let pad_token_id = lookup("pad_token", &config.pad_token)?;
        Ok(Tokenizer {
            vocab_size,
            special_ids,
            bos_token: config.bos_token.clone(),
            eos_token: config.eos_token.clone(),
            pad_token: config.pad_token.clone(),
            bos_token_id,
            eos_token_id,
            pad_token_id,
            inner,
        })
    }

    /// Token ids of `text`. Nothing is added around it (Qwen has no BOS), and special-token
    /// text such as `<|im_start|>` inside it becomes that token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`; with `skip_special_tokens` the special tokens (`<|im_end|>` ...)
    /// are left out, while the tool and think tags (added but not special) stay.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// An incremental decoder for streaming output; see [`DecodeStream`].
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream<'_> {
        DecodeStream::new(self, skip_special_tokens)
    }

    pub(crate) fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        match ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            Some(&id) => Err(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.vocab_size,
            }),
            None => Ok(()),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of `id` (byte-level form for regular tokens, e.g. `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// One more than the largest token id: the number of rows an embedding table needs.
    /// Ids below it can be unused when a trained vocabulary came out short.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Whether `id` is a special token (left out by `skip_special_tokens`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The id of tokenizer_config's `eos_token` (`<|im_end|>` for Qwen chat models).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }

    /// The underlying `tokenizers` object, for what this wrapper does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
