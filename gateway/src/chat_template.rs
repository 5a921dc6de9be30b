//! The chat template: the Jinja template from the model directory that turns an OpenAI-style
//! message list (plus tools) into the prompt text, rendered with minijinja the way transformers'
//! `apply_chat_template` renders it with Jinja2, byte for byte.
//!
//! What transformers sets up, and what is mirrored here: `trim_blocks` and `lstrip_blocks` on,
//! the trailing newline of the template dropped (Jinja2's default), loop controls, a `tojson`
//! filter that is Python's `json.dumps` (", " / ": " separators, `ensure_ascii=False`, keys in
//! insertion order, `indent`), the globals `raise_exception(msg)` and `strftime_now(fmt)`, and
//! the variables `messages`, `tools`, `documents`, `add_generation_prompt`, the special tokens
//! that are set (`bos_token`, `eos_token`, `pad_token`) plus any chat_template_kwargs. Python string methods (`.strip()`,
//! `.startswith()`, `.split()` ...) come from minijinja-contrib's pycompat, and values print
//! the way Python's `str()` prints them (`1e-05`, `['a', 1.0]`).

use crate::config::{ConfigError, TOKENIZER_CONFIG_FILE, TokenizerConfig};
use crate::pyfmt::{JsonOptions, json_dumps, py_str};
use crate::strftime::{DateTime, strftime};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// transformers ≥ 4.43 saves the template in its own file, which takes precedence.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

const TEMPLATE_NAME: &str = "chat_template";

/// Names transformers passes itself; chat_template_kwargs may not override them.
const RESERVED: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

#[derive(Debug, Error)]
pub enum TemplateError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("no chat template in {}: neither {CHAT_TEMPLATE_FILE} nor a `chat_template` in {TOKENIZER_CONFIG_FILE}", dir.display())]
    Missing { dir: PathBuf },
    #[error("invalid chat template: {0}")]
    Syntax(String),
    #[error("the chat template raised an exception: {0}")]
    Raised(String),
    #[error("chat template rendering failed: {0}")]
    Render(String),
    #[error("chat_template_kwargs may not set `{0}`: it is set from the request itself")]
    ReservedVariable(String),
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// (name, text) of the special tokens the template sees: transformers passes its
    /// `special_tokens_map`, which holds only the tokens that are set.
    special_tokens: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("special_tokens", &self.special_tokens)
            .field("source_len", &self.source.len())
            .finish()
    }
}

/// The payload of the error `raise_exception` returns, to tell it apart from other failures.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` / `eos_token` are the strings the template sees under
    /// those names (tokenizer_config's `bos_token` / `eos_token`); a `None` one is undefined
    /// in the template, as in transformers.
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson);
        env.add_filter("string", |value: &Value| Value::from(py_str(value)));
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |format: &str| {
            strftime(format, &DateTime::now_utc())
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            special_tokens: [("bos_token", bos_token), ("eos_token", eos_token)]
                .into_iter()
                .filter_map(|(name, token)| Some((name, token?.to_string())))
                .collect(),
        })
    }

    /// Loads the template of a model directory: `chat_template.jinja` if present, else the
    /// `chat_template` of `tokenizer_config.json`, whose `bos_token` / `eos_token` /
    /// `pad_token` it passes to the template.
    pub fn from_dir(dir: &Path) -> Result<Self, TemplateError> {
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = if config_path.is_file() {
            TokenizerConfig::from_file(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        let file = dir.join(CHAT_TEMPLATE_FILE);
        let source = if file.is_file() {
            std::fs::read_to_string(&file)
                .map_err(|source| TemplateError::Read { path: file, source })?
        } else {
            config
                .chat_template
                .clone()
                .ok_or_else(|| TemplateError::Missing {
                    dir: dir.to_path_buf(),
                })?
        };
        let mut template = Self::new(
            &source,
            config.bos_token.as_deref(),
            config.eos_token.as_deref(),
        )?;
        if let Some(pad) = config.pad_token {
            template.special_tokens.push(("pad_token", pad));
        }
        Ok(template)
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the prompt for `messages` (a JSON array of message objects), as
    /// `tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=...,
    /// tokenize=False, **extra)` does. `extra` holds chat_template_kwargs such as
    /// `enable_thinking`; it may override the special-token names, as in transformers.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, TemplateError> {
        if let Some(name) = RESERVED.iter().find(|name| extra.contains_key(**name)) {
            return Err(TemplateError::ReservedVariable(name.to_string()));
        }
        let mut context: Vec<(String, Value)> = self
            .special_tokens
            .iter()
            .map(|(name, token)| (name.to_string(), Value::from(token.as_str())))
            .collect();
        for (key, value) in extra {
            context.retain(|(k, _)| k != key);
            context.push((key.clone(), to_value(value)));
        }
        context.push(("messages".into(), to_value(messages)));
        context.push(("tools".into(), tools.map_or(Value::from(()), to_value)));
        context.push(("documents".into(), Value::from(())));
        context.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        template
            .render(Value::from_pairs(context))
            .map_err(|e| match raised_message(&e) {
                Some(message) => TemplateError::Raised(message),
                None => TemplateError::Render(describe(&e)),
            })
    }
}

/// JSON from the request, as a template value (maps keep their key order).
fn to_value(json: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match json {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::String(s) => Value::from(s.as_str()),
        J::Array(items) => Value::from(items.iter().map(to_value).collect::<Vec<_>>()),
        J::Object(map) => Value::from_pairs(map.iter().map(|(k, v)| (k.as_str(), to_value(v)))),
    }
}

/// Jinja2 prints values with Python's `str()`; strings and undefined go the default way.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &mut State,
    value: &Value,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            out.write_str(&py_str(value)).map_err(Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, args: &[Value], kwargs: Kwargs) -> Result<Value, Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > NAMES.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let mut params: [Option<Value>; 4] = Default::default();
    for (slot, arg) in params.iter_mut().zip(args) {
        *slot = Some(arg.clone());
    }
    for (slot, name) in params.iter_mut().zip(NAMES) {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            if slot.is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson got multiple values for argument '{name}'"),
                ));
            }
            *slot = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = params;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            ValueKind::Number if v.is_integer() => {
                let n = i64::try_from(v)?;
                Some(" ".repeat(usize::try_from(n).unwrap_or(0)))
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        },
    };
    let mut opts = JsonOptions::python_defaults(indent);
    opts.ensure_ascii = ensure_ascii.is_some_and(|v| v.is_true());
    opts.sort_keys = sort_keys.is_some_and(|v| v.is_true());
    if let Some(separators) = separators.filter(|v| !v.is_none()) {
        let parts: Vec<Value> = separators.try_iter()?.collect();
        match parts.as_slice() {
            [item, key] if item.as_str().is_some() && key.as_str().is_some() => {
                opts.item_separator = item.as_str().unwrap_or_default().to_string();
                opts.key_separator = key.as_str().unwrap_or_default().to_string();
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair of strings",
                ));
            }
        }
    }
    json_dumps(value, &opts).map(Value::from)
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, "raise_exception")
        .with_source(RaisedException(message)))
}

fn raised_message(err: &Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return Some(raised.0.clone());
        }
        cause = e.source();
    }
    None
}

/// The error with its location ("... (in chat_template:12)") and any causes.
fn describe(err: &Error) -> String {
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: serde_json::Value) -> Result<String, TemplateError> {
        let t = ChatTemplate::new(source, None, Some("<|im_end|>"))?;
        t.render(&messages, None, false, &serde_json::Map::new())
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let m = json!([{"role": "user", "content": "é", "n": [1, 2.0, null, true], "z": {}}]);
        assert_eq!(
            render("{{ messages[0] | tojson }}", m.clone()).unwrap(),
            r#"{"role": "user", "content": "é", "n": [1, 2.0, null, true], "z": {}}"#
        );
        assert_eq!(
            render("{{ messages[0].n | tojson(indent=2) }}", m.clone()).unwrap(),
            "[\n  1,\n  2.0,\n  null,\n  true\n]"
        );
        assert_eq!(
            render("{{ messages[0] | tojson(ensure_ascii=true, sort_keys=true, separators=[',', ':']) }}", m.clone())
                .unwrap(),
            r#"{"content":"\u00e9","n":[1,2.0,null,true],"role":"user","z":{}}"#
        );
        assert!(render("{{ messages | tojson(bogus=1) }}", m).is_err());
    }

    #[test]
    fn values_print_like_python() {
        // Plain minijinja would print "0.00001" and "[1e-5, 'a']".
        let m = json!([{"flag": true, "none": null, "list": ["a", 1], "x": 1e-5}]);
        assert_eq!(
            render("{{ messages[0].flag }} {{ messages[0].none }} {{ messages[0].list }} {{ messages[0].x }} {{ messages[0].flag | string }}", m).unwrap(),
            "True None ['a', 1] 1e-05 True"
        );
    }

    #[test]
    fn python_methods_and_whitespace_control() {
        let src = "{% for m in messages %}\n  {{ m.content.strip().split(',')[1] }}|{{ m.content.startswith('  a') }}\n{% endfor %}\n";
        // lstrip_blocks strips before block tags only, so the indentation of `{{` stays.
        assert_eq!(
            render(src, json!([{"content": "  a,b  "}])).unwrap(),
            "  b|True\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error_with_its_message() {
        let err = render(
            "{{ raise_exception('Only user and assistant roles are supported!') }}",
            json!([]),
        )
        .unwrap_err();
        match err {
            TemplateError::Raised(msg) => {
                assert_eq!(msg, "Only user and assistant roles are supported!")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn syntax_errors_are_reported_at_construction() {
        let err = ChatTemplate::new("{% if %}", None, None).unwrap_err();
        assert!(matches!(err, TemplateError::Syntax(_)), "{err}");
        assert!(err.to_string().contains("syntax error"), "{err}");
    }

    #[test]
    fn variables_and_kwargs() {
        let t = ChatTemplate::new(
            "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ tools | length }}|{{ enable_thinking }}|{{ strftime_now('%Y') | length }}",
            Some("<s>"),
            Some("</s>"),
        )
        .unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert("enable_thinking".into(), json!(false));
        let out = t
            .render(&json!([]), Some(&json!([{"a": 1}])), true, &extra)
            .unwrap();
        assert_eq!(out, "<s>|</s>|True|1|False|4");
        let unset =
            ChatTemplate::new("[{{ bos_token }}]{{ bos_token is defined }}", None, None).unwrap();
        assert_eq!(
            unset.render(&json!([]), None, false, &extra).unwrap(),
            "[]False"
        );
        extra.insert("messages".into(), json!([]));
        assert!(matches!(
            t.render(&json!([]), None, true, &extra),
            Err(TemplateError::ReservedVariable(_))
        ));
    }

    #[test]
    fn trailing_newline_is_dropped_like_jinja2() {
        assert_eq!(render("x\n", json!([])).unwrap(), "x");
        assert_eq!(render("x\n\n", json!([])).unwrap(), "x\n");
    }
}
