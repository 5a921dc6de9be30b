//! Reading `tokenizer_config.json`, the transformers-side tokenizer settings: the names of the
//! BOS / EOS / pad tokens, the added-token table and the chat template.

use serde_json::Value;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The file name transformers uses.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed JSON in {}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: field `{field}` {problem}", path.display())]
    Field {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

/// One entry of `added_tokens_decoder`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedTokenEntry {
    pub id: u32,
    pub content: String,
    pub special: bool,
}

/// The parts of `tokenizer_config.json` that Myriad uses.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// The `chat_template` field; when it is a list of named templates, the one named
    /// "default" (transformers' choice when no name is given).
    pub chat_template: Option<String>,
    /// `added_tokens_decoder`, in id order.
    pub added_tokens: Vec<AddedTokenEntry>,
}

impl TokenizerConfig {
    /// Reads and parses `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the text of a `tokenizer_config.json`; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let doc: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let field_error = |field: &str, problem: &str| ConfigError::Field {
            path: path.to_path_buf(),
            field: field.to_string(),
            problem: problem.to_string(),
        };
        let Value::Object(map) = &doc else {
            return Err(field_error("(top level)", "is not a JSON object"));
        };
        let token = |field: &str| -> Result<Option<String>, ConfigError> {
            match map.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                // Older files store an AddedToken dict.
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(field_error(
                        field,
                        "is an object without a string `content`",
                    )),
                },
                Some(_) => Err(field_error(
                    field,
                    "is neither a string, an object nor null",
                )),
            }
        };
        let chat_template = match map.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => {
                let mut found = None;
                for entry in list {
                    let name = entry.get("name").and_then(Value::as_str);
                    let template = entry.get("template").and_then(Value::as_str);
                    match (name, template) {
                        (Some("default"), Some(t)) => found = Some(t.to_string()),
                        (Some(_), Some(_)) => {}
                        _ => {
                            return Err(field_error(
                                "chat_template",
                                "has a list entry without string `name` and `template`",
                            ));
                        }
                    }
                }
                found
            }
            Some(_) => {
                return Err(field_error(
                    "chat_template",
                    "is neither a string nor a list",
                ));
            }
        };
        let mut added_tokens = Vec::new();
        match map.get("added_tokens_decoder") {
            None | Some(Value::Null) => {}
            Some(Value::Object(table)) => {
                for (id, entry) in table {
                    let field = format!("added_tokens_decoder.{id}");
                    let id: u32 = id
                        .parse()
                        .map_err(|_| field_error(&field, "has a key that is not a token id"))?;
                    let content = entry
                        .get("content")
                        .and_then(Value::as_str)
                        .ok_or_else(|| field_error(&field, "has no string `content`"))?;
                    let special = entry
                        .get("special")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    added_tokens.push(AddedTokenEntry {
                        id,
                        content: content.to_string(),
                        special,
                    });
                }
            }
            Some(_) => return Err(field_error("added_tokens_decoder", "is not an object")),
        }
        added_tokens.sort_by_key(|t| t.id);
        Ok(TokenizerConfig {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            pad_token: token("pad_token")?,
            chat_template,
            added_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_token_forms_and_template_lists() {
        let text = r#"{
            "bos_token": null,
            "eos_token": {"__type": "AddedToken", "content": "<|im_end|>"},
            "pad_token": "<|endoftext|>",
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
            "added_tokens_decoder": {"7": {"content": "<b>", "special": false}, "5": {"content": "<a>", "special": true}}
        }"#;
        let cfg = TokenizerConfig::parse(text, Path::new("x/tokenizer_config.json")).unwrap();
        assert_eq!(cfg.bos_token, None);
        assert_eq!(cfg.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(cfg.pad_token.as_deref(), Some("<|endoftext|>"));
        assert_eq!(cfg.chat_template.as_deref(), Some("D"));
        assert_eq!(cfg.added_tokens[0].id, 5);
        assert!(cfg.added_tokens[0].special);
        assert_eq!(cfg.added_tokens[1].content, "<b>");
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let err =
            TokenizerConfig::parse(r#"{"eos_token": 3}"#, Path::new("m/tokenizer_config.json"))
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("m/tokenizer_config.json") && err.contains("eos_token"),
            "{err}"
        );
        let err = TokenizerConfig::parse("{", Path::new("m/tokenizer_config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("malformed JSON in m/tokenizer_config.json"),
            "{err}"
        );
    }
}
