//! Myriad's front door: the tokenizer ([`Tokenizer`], with [`DecodeStream`] for streaming),
//! the chat template ([`ChatTemplate`], a byte-for-byte match of transformers'
//! `apply_chat_template`), the tokenizer trainer ([`train_tokenizer`]) that gives a
//! `myriad make-model` checkpoint a working tokenizer without downloading anything, and the
//! OpenAI-compatible HTTP API ([`http`]: [`router`] over a [`GatewayState`], [`serve`]), and
//! the proxy that fronts several attention nodes serving that API ([`proxy`]:
//! [`proxy::proxy_router`], [`proxy::serve_proxy`]).

pub mod chat_template;
pub mod config;
mod corpus;
mod decode_stream;
pub mod http;
pub mod proxy;
mod pyfmt;
mod strftime;
pub mod tokenizer;
pub mod train;

pub use chat_template::{CHAT_TEMPLATE_FILE, ChatTemplate, TemplateError};
pub use config::{AddedTokenEntry, ConfigError, TOKENIZER_CONFIG_FILE, TokenizerConfig};
pub use decode_stream::{DecodeState, DecodeStream};
pub use http::{
    GatewayConfig, GatewayError, GatewayState, LoadReport, bind_and_serve, router, serve,
};
pub use tokenizer::{TOKENIZER_FILE, Tokenizer, TokenizerError};
pub use train::{CHAT_TEMPLATE, TokenizerFiles, TokenizerSpec, TrainError, train_tokenizer};
