//! Python-compatible formatting of template values.
//!
//! Hugging Face chat templates are written against Jinja2, so what they produce depends on how
//! Python turns values into text: transformers' `tojson` filter is `json.dumps` (", " and ": "
//! separators, `ensure_ascii=False`, keys in insertion order), and Jinja2 prints `{{ value }}`
//! and applies `|string` with `str()` (`True`, `None`, `['a', 1]`, `1e-05`). minijinja's own
//! conventions differ in places (compact JSON; floats printed Rust's way, `0.00001` and
//! `[1e-5]`), so the chat template swaps in these.

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};
use std::fmt::Write as _;

/// The keyword arguments of `json.dumps` that transformers' `tojson` filter forwards.
#[derive(Debug, Clone)]
pub(crate) struct JsonOptions {
    pub ensure_ascii: bool,
    /// `None` writes everything on one line; `Some(unit)` puts each item on its own line,
    /// indented by `unit` per level (Python's `indent=`, an int meaning that many spaces).
    pub indent: Option<String>,
    pub item_separator: String,
    pub key_separator: String,
    pub sort_keys: bool,
}

impl JsonOptions {
    /// `json.dumps` defaults as transformers calls it: `ensure_ascii=False`, and separators
    /// that depend on `indent` the way Python picks them.
    pub fn python_defaults(indent: Option<String>) -> Self {
        let item_separator = if indent.is_some() { "," } else { ", " };
        JsonOptions {
            ensure_ascii: false,
            indent,
            item_separator: item_separator.to_string(),
            key_separator: ": ".to_string(),
            sort_keys: false,
        }
    }
}

/// `json.dumps(value, **opts)`.
pub(crate) fn json_dumps(value: &Value, opts: &JsonOptions) -> Result<String, Error> {
    let mut out = String::new();
    write_json(&mut out, value, opts, 0)?;
    Ok(out)
}

fn write_json(
    out: &mut String,
    value: &Value,
    opts: &JsonOptions,
    level: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&json_number(value)?),
        ValueKind::String => {
            write_json_string(out, value.as_str().unwrap_or_default(), opts.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_json_container(out, ('[', ']'), &items, opts, level, |out, item, level| {
                write_json(out, item, opts, level)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_json_container(
                out,
                ('{', '}'),
                &entries,
                opts,
                level,
                |out, (key, item), level| {
                    write_json_string(out, key, opts.ensure_ascii);
                    out.push_str(&opts.key_separator);
                    write_json(out, item, opts, level)
                },
            )?;
        }
        ValueKind::Undefined => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: an undefined value is not JSON serializable",
            ));
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {other} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

/// Python's list/dict layout: everything inline, or with `indent` one item per line.
fn write_json_container<T>(
    out: &mut String,
    (open, close): (char, char),
    items: &[T],
    opts: &JsonOptions,
    level: usize,
    mut write_item: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline_indent = |depth: usize| {
        opts.indent
            .as_ref()
            .map(|unit| format!("\n{}", unit.repeat(depth)))
            .unwrap_or_default()
    };
    let inner = newline_indent(level + 1);
    out.push_str(&inner);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&opts.item_separator);
            out.push_str(&inner);
        }
        write_item(out, item, level + 1)?;
    }
    out.push_str(&newline_indent(level));
    out.push(close);
    Ok(())
}

/// Python converts non-string dict keys to strings before writing them.
fn json_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::Number => json_number(key),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::None => Ok("null".to_string()),
        other => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {other}"),
        )),
    }
}

fn json_number(value: &Value) -> Result<String, Error> {
    if value.is_integer() {
        return Ok(value.to_string());
    }
    let f = f64::try_from(value.clone())?;
    Ok(if f.is_nan() {
        "NaN".to_string()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
    } else {
        float_repr(f)
    })
}

fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            // Python's ASCII mode escapes everything outside ' '..='~', DEL included.
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `repr(f)` for a finite float: the shortest round-tripping digits, laid out the way Python
/// does (positional for 1e-4 <= |f| < 1e16, otherwise `d.ddde+XX`).
pub(crate) fn float_repr(f: f64) -> String {
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    // Rust's `{:e}` gives the shortest round-trip digits, as Python's repr does.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if f < 0.0 { "-" } else { "" };
    // Python's `decpt`: the decimal point sits after this many digits.
    let decpt = exponent + 1;
    if decpt > -4 && decpt <= 16 {
        let body = if decpt <= 0 {
            format!("0.{}{}", "0".repeat(decpt.unsigned_abs() as usize), digits)
        } else {
            let point = decpt as usize;
            if point >= digits.len() {
                format!("{}{}.0", digits, "0".repeat(point - digits.len()))
            } else {
                format!("{}.{}", &digits[..point], &digits[point..])
            }
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        let fraction = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!(
            "{sign}{first}{fraction}e{exp_sign}{:02}",
            exponent.unsigned_abs()
        )
    }
}

/// Python's `str(value)`: strings as they are, everything else like `repr`.
pub(crate) fn py_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        ValueKind::Undefined => String::new(),
        _ => py_repr(value),
    }
}

/// Python's `repr(value)` for the value types JSON and templates produce.
pub(crate) fn py_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => "Undefined".to_string(),
        ValueKind::None => "None".to_string(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.to_string(),
        ValueKind::Number => {
            if value.is_integer() {
                value.to_string()
            } else {
                match f64::try_from(value.clone()) {
                    Ok(f) if f.is_nan() => "nan".to_string(),
                    Ok(f) if f.is_infinite() => if f > 0.0 { "inf" } else { "-inf" }.to_string(),
                    Ok(f) => float_repr(f),
                    Err(_) => value.to_string(),
                }
            }
        }
        ValueKind::String => string_repr(value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => match value.try_iter() {
            Ok(items) => {
                let parts: Vec<String> = items.map(|item| py_repr(&item)).collect();
                format!("[{}]", parts.join(", "))
            }
            Err(_) => value.to_string(),
        },
        ValueKind::Map => match value.try_iter() {
            Ok(keys) => {
                let parts: Vec<String> = keys
                    .map(|key| {
                        let item = value.get_item(&key).unwrap_or_default();
                        format!("{}: {}", py_repr(&key), py_repr(&item))
                    })
                    .collect();
                format!("{{{}}}", parts.join(", "))
            }
            Err(_) => value.to_string(),
        },
        _ => value.to_string(),
    }
}

/// `repr(s)`: single quotes unless only double quotes avoid escaping, with Python's escapes.
fn string_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !is_printable(c) => {
                let code = c as u32;
                let _ = match code {
                    0..=0xff => write!(out, "\\x{code:02x}"),
                    0x100..=0xffff => write!(out, "\\u{code:04x}"),
                    _ => write!(out, "\\U{code:08x}"),
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// An approximation of Python's `str.isprintable` without Unicode tables: control and format
/// characters and the separators other than the ASCII space are not printable.
fn is_printable(c: char) -> bool {
    !matches!(c as u32,
        0x00..=0x1f | 0x7f..=0xa0 | 0xad | 0x1680 | 0x180e | 0x2000..=0x200f | 0x2028..=0x202f
        | 0x205f..=0x206f | 0x3000 | 0xd800..=0xdfff | 0xe000..=0xf8ff | 0xfeff | 0xfff9..=0xfffb
        | 0xf0000..=0x10ffff)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dumps(v: Value) -> String {
        json_dumps(&v, &JsonOptions::python_defaults(None)).unwrap()
    }

    #[test]
    fn floats_follow_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e16, "1.5e+16"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.2345e-7, "1.2345e-07"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e300, "1e+300"),
            (-0.0, "-0.0"),
            (2.71, "2.71"),
        ];
        for (f, want) in cases {
            assert_eq!(float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn json_matches_python_dumps() {
        let v = Value::from_pairs([
            ("b", Value::from(1)),
            (
                "a",
                Value::from(vec![Value::from(true), Value::from(()), Value::from(2.5)]),
            ),
            ("s", Value::from("é \"q\" \\ \n\u{1}\u{7f}🙂")),
        ]);
        assert_eq!(
            dumps(v.clone()),
            "{\"b\": 1, \"a\": [true, null, 2.5], \"s\": \"é \\\"q\\\" \\\\ \\n\\u0001\u{7f}🙂\"}"
        );
        let mut opts = JsonOptions::python_defaults(None);
        opts.ensure_ascii = true;
        opts.sort_keys = true;
        assert_eq!(
            json_dumps(&v, &opts).unwrap(),
            r#"{"a": [true, null, 2.5], "b": 1, "s": "\u00e9 \"q\" \\ \n\u0001\u007f\ud83d\ude42"}"#
        );
        let opts = JsonOptions::python_defaults(Some("  ".into()));
        assert_eq!(
            json_dumps(
                &Value::from_pairs([
                    ("k", Value::from(vec![1, 2])),
                    ("e", Value::from(Vec::<i32>::new()))
                ]),
                &opts
            )
            .unwrap(),
            "{\n  \"k\": [\n    1,\n    2\n  ],\n  \"e\": []\n}"
        );
    }

    #[test]
    fn repr_matches_python() {
        assert_eq!(py_str(&Value::from(true)), "True");
        assert_eq!(py_str(&Value::from(())), "None");
        assert_eq!(py_str(&Value::from("it's")), "it's");
        assert_eq!(
            py_str(&Value::from(vec![
                Value::from("a"),
                Value::from("it's"),
                Value::from(1e-5)
            ])),
            "['a', \"it's\", 1e-05]"
        );
        assert_eq!(
            py_str(&Value::from_pairs([("k", Value::from("a'b\"c\n"))])),
            r#"{'k': 'a\'b"c\n'}"#
        );
    }
}
