//! Reading a chat request: its fields and their validation (messages, tools and
//! `tool_choice`, logprobs, vLLM's template options), the messages normalised for the chat
//! template, and the prompt rendered and tokenised.

use serde_json::{Map, Value};

use super::error::ApiError;
use super::params::{Common, Fields, MaxTokens, type_error};
use super::reasoning::prompt_opens_reasoning;
use super::state::GatewayState;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// A parsed chat request.
pub(crate) struct ChatRequest {
    pub common: Common,
    pub messages: Value,
    /// The tools handed to the template (none with `tool_choice: "none"`).
    pub tools: Option<Vec<Value>>,
    /// Top alternatives per token when `logprobs` is on.
    pub logprobs: Option<usize>,
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    pub kwargs: Map<String, Value>,
}

impl ChatRequest {
    pub(crate) fn parse(f: &Fields, state: &GatewayState) -> Result<Self, ApiError> {
        let common = Common::parse(
            f,
            state,
            MaxTokens {
                fields: &["max_completion_tokens", "max_tokens"],
                min: 1,
            },
        )?;
        let messages = match f.array("messages")? {
            None => {
                return Err(ApiError::invalid_param(
                    "messages",
                    "`messages` is required.",
                ));
            }
            Some(m) if m.is_empty() => {
                return Err(ApiError::invalid_param(
                    "messages",
                    "`messages` must contain at least one message.",
                ));
            }
            Some(m) => m
                .iter()
                .enumerate()
                .map(|(i, m)| normalize_message(i, m))
                .collect::<Result<Vec<_>, _>>()?,
        };

        let tools = match f.array("tools")? {
            None => None,
            Some(tools) => {
                for (i, tool) in tools.iter().enumerate() {
                    let name = tool
                        .get("function")
                        .and_then(|f| f.get("name"))
                        .and_then(Value::as_str);
                    if tool.get("type").and_then(Value::as_str) != Some("function")
                        || name.is_none()
                    {
                        return Err(ApiError::invalid_param(
                            &format!("tools[{i}]"),
                            "Each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., ...}}.",
                        ));
                    }
                }
                Some(tools.clone()).filter(|t| !t.is_empty())
            }
        };
        let tools = match f.get("tool_choice") {
            None => tools,
            Some(Value::String(s)) if s == "none" => None,
            Some(Value::String(s)) if s == "auto" || s == "required" => {
                if tools.is_none() {
                    return Err(ApiError::invalid_param(
                        "tool_choice",
                        format!("`tool_choice` \"{s}\" requires `tools`."),
                    ));
                }
                tools
            }
            Some(Value::Object(choice)) => {
                let name = choice
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::invalid_param(
                            "tool_choice",
                            "A named `tool_choice` must be {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                        )
                    })?;
                let known = tools.iter().flatten().any(|t| {
                    t.get("function")
                        .and_then(|f| f.get("name"))
                        .and_then(Value::as_str)
                        == Some(name)
                });
                if !known {
                    return Err(ApiError::invalid_param(
                        "tool_choice",
                        format!(
                            "`tool_choice` names the function `{name}`, which is not in `tools`."
                        ),
                    ));
                }
                tools
            }
            Some(other) => {
                return Err(type_error(
                    "tool_choice",
                    "\"none\", \"auto\", \"required\" or a named function",
                    other,
                ));
            }
        };

        let logprobs_on = f.bool("logprobs")?.unwrap_or(false);
        let top = f.usize("top_logprobs")?;
        if let Some(k) = top {
            if !logprobs_on && k > 0 {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    "`logprobs` must be true when `top_logprobs` is used.",
                ));
            }
            if k > state.config().max_logprobs {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    format!(
                        "`top_logprobs` must be at most {}, got {k}.",
                        state.config().max_logprobs
                    ),
                ));
            }
        }
        if let Some(format) = f.object("response_format")? {
            match format.get("type").and_then(Value::as_str) {
                Some("text") => {}
                other => {
                    return Err(ApiError::invalid_param(
                        "response_format",
                        format!(
                            "`response_format` type {} is not supported; only \"text\" is.",
                            other.unwrap_or("(missing)")
                        ),
                    ));
                }
            }
        }

        let add_generation_prompt = f.bool("add_generation_prompt")?.unwrap_or(true);
        let continue_final_message = f.bool("continue_final_message")?.unwrap_or(false);
        if add_generation_prompt && continue_final_message {
            return Err(ApiError::invalid_param(
                "continue_final_message",
                "`continue_final_message` and `add_generation_prompt` cannot both be true.",
            ));
        }
        let kwargs = f
            .object("chat_template_kwargs")?
            .cloned()
            .unwrap_or_default();

        Ok(ChatRequest {
            common,
            messages: Value::Array(messages),
            tools,
            logprobs: logprobs_on.then(|| top.unwrap_or(0)),
            add_generation_prompt,
            continue_final_message,
            kwargs,
        })
    }
}

/// A message as the template should see it: text parts joined into one string (as vLLM's
/// "string" content format does, which every template understands), `developer` as `system`
/// (templates predate it), tool-call arguments parsed from their JSON text into objects (vLLM
/// does this too; templates iterate over them or `tojson` them).
fn normalize_message(i: usize, message: &Value) -> Result<Value, ApiError> {
    let param = format!("messages[{i}]");
    let Value::Object(m) = message else {
        return Err(type_error(&param, "an object", message));
    };
    let mut m = m.clone();
    let role = match m.get("role") {
        Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
        _ => {
            return Err(ApiError::invalid_param(
                &format!("{param}.role"),
                format!("`role` must be one of {}.", ROLES.join(", ")),
            ));
        }
    };
    if role == "developer" {
        m.insert("role".into(), Value::from("system"));
    }
    match m.get("content") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str);
                match (kind, part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(text)) => texts.push(text),
                    _ => {
                        return Err(ApiError::invalid_param(
                            &format!("{param}.content[{j}]"),
                            format!(
                                "Only text content parts are supported, got type {}.",
                                kind.unwrap_or("(missing)")
                            ),
                        ));
                    }
                }
            }
            m.insert("content".into(), Value::from(texts.join("\n")));
        }
        Some(other) => {
            return Err(type_error(
                &format!("{param}.content"),
                "a string or a list of content parts",
                other,
            ));
        }
    }
    if let Some(Value::Array(calls)) = m.get_mut("tool_calls") {
        for call in calls {
            if let Some(Value::String(args)) = call.pointer("/function/arguments")
                && let Ok(parsed @ Value::Object(_)) = serde_json::from_str::<Value>(args)
                && let Some(slot) = call.pointer_mut("/function/arguments")
            {
                *slot = parsed;
            }
        }
    }
    Ok(Value::Object(m))
}

/// The rendered, tokenised prompt.
pub(crate) struct Prompt {
    pub ids: Vec<u32>,
    /// The template opened `<think>`: the reply starts inside the reasoning.
    pub in_reasoning: bool,
}

pub(crate) fn render_prompt(state: &GatewayState, req: &ChatRequest) -> Result<Prompt, ApiError> {
    let template = state.template().ok_or_else(|| {
        ApiError::invalid(
            "This model has no chat template, so it cannot serve chat completions; use /v1/completions.",
        )
    })?;
    let tools = req.tools.as_ref().map(|t| Value::Array(t.clone()));
    let mut text = template
        .render(
            &req.messages,
            tools.as_ref(),
            req.add_generation_prompt,
            &req.kwargs,
        )
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if req.continue_final_message {
        // The template closes the last message; cut after its content so the model continues it.
        let last = req.messages.as_array().and_then(|m| m.last());
        let content = last
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some(at) = text.rfind(content).filter(|_| !content.is_empty()) {
            text.truncate(at + content.len());
        }
    }
    let ids = state
        .tokenizer()
        .encode(&text)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::invalid_param("messages", "The prompt is empty."));
    }
    Ok(Prompt {
        ids,
        in_reasoning: state.config().reasoning && prompt_opens_reasoning(&text),
    })
}
