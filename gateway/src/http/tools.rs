//! Tool calls in the model's output: `<tool_call>…</tool_call>` blocks become OpenAI
//! `tool_calls`, incrementally, so a stream emits each call as soon as its closing tag arrives
//! and a full response gets the same calls.
//!
//! Two bodies are understood: Hermes-style JSON (`{"name": …, "arguments": {…}}`, Qwen3 and
//! Qwen3-Next) and the Qwen3-Coder / Qwen3.5 XML form (`<function=NAME><parameter=P>value
//! </parameter></function>`, whose values are typed from the tool's JSON schema). Text around
//! the calls is content; whitespace after a call (the model's separator between calls) is
//! dropped. A block that does not parse is passed through as content, so nothing the model
//! wrote is lost.

use serde_json::{Map, Value};

use super::reasoning::partial_tag_suffix;

pub(crate) const CALL_START: &str = "<tool_call>";
pub(crate) const CALL_END: &str = "</tool_call>";

/// One parsed call: the function name and its arguments as a JSON text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// What a piece of content text turned into.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ToolDelta {
    pub content: String,
    pub calls: Vec<ToolCall>,
}

/// Incremental `<tool_call>` parser.
#[derive(Clone, Debug)]
pub(crate) struct ToolParser {
    /// The request's `tools` (for the parameter types of the XML form).
    tools: Vec<Value>,
    held: String,
    in_call: bool,
    /// Whitespace after a call, released only if more content follows.
    after_call: bool,
    pub(crate) calls: usize,
}

impl ToolParser {
    pub(crate) fn new(tools: Vec<Value>) -> Self {
        ToolParser {
            tools,
            held: String::new(),
            in_call: false,
            after_call: false,
            calls: 0,
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> ToolDelta {
        self.held.push_str(text);
        let mut out = ToolDelta::default();
        loop {
            if self.in_call {
                let Some(at) = self.held.find(CALL_END) else {
                    return out;
                };
                let body = self.held[..at].to_string();
                self.held.drain(..at + CALL_END.len());
                self.in_call = false;
                self.close_call(&body, true, &mut out);
                continue;
            }
            if let Some(at) = self.held.find(CALL_START) {
                let before = self.held[..at].to_string();
                self.emit_content(&before, &mut out);
                self.held.drain(..at + CALL_START.len());
                self.in_call = true;
                continue;
            }
            let keep = partial_tag_suffix(&self.held, CALL_START);
            let release = self.held[..self.held.len() - keep].to_string();
            self.held.drain(..release.len());
            self.emit_content(&release, &mut out);
            return out;
        }
    }

    /// The output ended: an unterminated call is parsed as far as it goes (the model may have
    /// stopped right before `</tool_call>`); other held text is content.
    pub(crate) fn finish(&mut self) -> ToolDelta {
        let mut out = ToolDelta::default();
        let held = std::mem::take(&mut self.held);
        if self.in_call {
            self.in_call = false;
            self.close_call(&held, false, &mut out);
        } else {
            self.emit_content(&held, &mut out);
        }
        out
    }

    fn close_call(&mut self, body: &str, closed: bool, out: &mut ToolDelta) {
        match parse_call(body, &self.tools) {
            Some(call) => {
                out.calls.push(call);
                self.calls += 1;
                self.after_call = true;
            }
            None => {
                let raw = format!("{CALL_START}{body}{}", if closed { CALL_END } else { "" });
                self.emit_content(&raw, out);
            }
        }
    }

    fn emit_content(&mut self, text: &str, out: &mut ToolDelta) {
        if text.is_empty() {
            return;
        }
        if self.after_call {
            if text.trim().is_empty() {
                return;
            }
            self.after_call = false;
            out.content.push_str(text.trim_start());
            return;
        }
        out.content.push_str(text);
    }
}

/// Parses the inside of a `<tool_call>` block.
fn parse_call(body: &str, tools: &[Value]) -> Option<ToolCall> {
    let body = body.trim();
    if body.starts_with('{') {
        return parse_json_call(body);
    }
    parse_xml_call(body, tools)
}

fn parse_json_call(body: &str) -> Option<ToolCall> {
    let Value::Object(call) = serde_json::from_str::<Value>(body).ok()? else {
        return None;
    };
    let name = call.get("name")?.as_str()?.to_string();
    let arguments = match call.get("arguments").or_else(|| call.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        // Already a JSON text (some models quote it).
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    Some(ToolCall { name, arguments })
}

/// `<function=NAME>\n<parameter=P>\nVALUE\n</parameter>…</function>`.
fn parse_xml_call(body: &str, tools: &[Value]) -> Option<ToolCall> {
    let rest = body.strip_prefix("<function=")?;
    let (name, mut rest) = rest.split_once('>')?;
    let name = name.trim().to_string();
    let schema = tool_properties(tools, &name);
    let mut args = Map::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() || rest.starts_with("</function>") {
            break;
        }
        let after = rest.strip_prefix("<parameter=")?;
        let (param, after) = after.split_once('>')?;
        // A missing `</parameter>` ends at the next parameter or the end of the function.
        let end = ["</parameter>", "<parameter=", "</function>"]
            .iter()
            .filter_map(|t| after.find(t))
            .min()
            .unwrap_or(after.len());
        let raw = &after[..end];
        let raw = raw.strip_prefix('\n').unwrap_or(raw);
        let raw = raw.strip_suffix('\n').unwrap_or(raw);
        let param = param.trim();
        let ty = schema
            .and_then(|p| p.get(param))
            .and_then(|p| p.get("type"))
            .and_then(Value::as_str);
        args.insert(param.to_string(), typed_value(raw, ty));
        rest = after[end..]
            .strip_prefix("</parameter>")
            .unwrap_or(&after[end..]);
    }
    Some(ToolCall {
        name,
        arguments: Value::Object(args).to_string(),
    })
}

/// The `parameters.properties` of the named tool.
fn tool_properties<'t>(tools: &'t [Value], name: &str) -> Option<&'t Map<String, Value>> {
    tools
        .iter()
        .filter_map(|t| t.get("function"))
        .find(|f| f.get("name").and_then(Value::as_str) == Some(name))?
        .get("parameters")?
        .get("properties")?
        .as_object()
}

/// An XML parameter value as its schema type says (strings stay strings; anything that does
/// not parse as the declared type also stays a string rather than being lost).
fn typed_value(raw: &str, ty: Option<&str>) -> Value {
    match ty {
        None | Some("string") => Value::String(raw.to_string()),
        Some(_) => {
            serde_json::from_str(raw.trim()).unwrap_or_else(|_| Value::String(raw.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn run(pieces: &[&str]) -> (ToolDelta, Vec<ToolDelta>) {
        let mut p = ToolParser::new(vec![json!({"type": "function", "function": {"name": "add",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "note": {"type": "string"}}}}})]);
        let mut steps: Vec<ToolDelta> = pieces.iter().map(|t| p.push(t)).collect();
        steps.push(p.finish());
        let mut all = ToolDelta::default();
        for s in &steps {
            all.content.push_str(&s.content);
            all.calls.extend(s.calls.iter().cloned());
        }
        (all, steps)
    }

    #[test]
    fn json_calls_with_content_before() {
        let text = "Let me check.\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"noop\"}\n</tool_call>";
        let (all, _) = run(&[text]);
        assert_eq!(all.content, "Let me check.\n\n");
        assert_eq!(
            all.calls,
            [
                ToolCall {
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into()
                },
                ToolCall {
                    name: "noop".into(),
                    arguments: "{}".into()
                },
            ]
        );
    }

    #[test]
    fn calls_split_across_pieces_are_emitted_when_complete() {
        let pieces = [
            "Hi <tool",
            "_call>\n{\"name\": \"f\", ",
            "\"arguments\": {\"x\": 1}}\n</tool_",
            "call>",
            "\n",
        ];
        let (all, steps) = run(&pieces);
        assert_eq!(all.content, "Hi ");
        assert_eq!(all.calls.len(), 1);
        // The call comes out with the piece that closes it, not before.
        assert!(steps[2].calls.is_empty());
        assert_eq!(steps[3].calls[0].arguments, r#"{"x":1}"#);
        for s in &steps {
            assert!(!s.content.contains('<'), "{s:?}");
        }
    }

    #[test]
    fn xml_form_is_typed_by_the_schema() {
        let text = "<tool_call>\n<function=add>\n<parameter=a>\n12\n</parameter>\n<parameter=note>\n007\n</parameter>\n</function>\n</tool_call>";
        let (all, _) = run(&[text]);
        assert_eq!(all.calls[0].name, "add");
        let args: Value = serde_json::from_str(&all.calls[0].arguments).unwrap();
        assert_eq!(args, json!({"a": 12, "note": "007"}));
    }

    #[test]
    fn broken_or_unterminated_calls() {
        let (all, _) = run(&["<tool_call>not json</tool_call> tail"]);
        assert_eq!(all.content, "<tool_call>not json</tool_call> tail");
        assert!(all.calls.is_empty());
        // Stopped before the closing tag: still a call.
        let (all, _) = run(&["<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n"]);
        assert_eq!(all.calls[0].name, "f");
        // Text after a call is content; the separating whitespace is not.
        let (all, _) = run(&["<tool_call>{\"name\": \"f\"}</tool_call>\n\n", "Done."]);
        assert_eq!(all.content, "Done.");
    }
}
