//! Myriad's front door. Today: the tokenizer ([`Tokenizer`], with [`DecodeStream`] for
//! streaming), the chat template ([`ChatTemplate`], a byte-for-byte match of transformers'
//! `apply_chat_template`) and the tokenizer trainer ([`train_tokenizer`]) that gives a
//! `myriad make-model` checkpoint a working tokenizer without downloading anything. The
//! OpenAI-compatible HTTP API joins them here.

pub mod chat_template;
pub mod config;
mod corpus;
mod decode_stream;
mod pyfmt;
mod strftime;
pub mod tokenizer;
pub mod train;

pub use chat_template::{CHAT_TEMPLATE_FILE, ChatTemplate, TemplateError};
pub use config::{AddedTokenEntry, ConfigError, TOKENIZER_CONFIG_FILE, TokenizerConfig};
pub use decode_stream::DecodeStream;
pub use tokenizer::{TOKENIZER_FILE, Tokenizer, TokenizerError};
pub use train::{CHAT_TEMPLATE, TokenizerFiles, TokenizerSpec, TrainError, train_tokenizer};
