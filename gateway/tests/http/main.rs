//! The HTTP API end to end: a real server on 127.0.0.1 with the fixture tokenizer and chat
//! template, a fake engine behind `Generate`, and raw HTTP/1.1 over TCP; `load` covers what a
//! node tells the proxy, `proxy` the proxy in front of such nodes.
#![allow(clippy::unwrap_used)]

mod load;
mod proxy;
mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use myriad_engine_api::SubmitError;
use myriad_gateway::ChatTemplate;
use serde_json::{Value, json};
use support::*;
use tokio::io::AsyncReadExt;

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is 2+2?"}],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn prompt_text(server: &Server, i: usize) -> String {
    let req = &server.engine.requests()[i];
    tokenizer().decode(&req.prompt, false).unwrap()
}

/// Concatenation of a string field of every chunk's first choice delta.
fn delta_text(chunks: &[Value], field: &str) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|c| c["delta"][field].as_str())
        .collect()
}

// ---- basics ----------------------------------------------------------------------------------

#[tokio::test]
async fn models_health_metrics_and_unknown_routes() {
    let s = start().await;
    let r = get(s.addr, "/v1/models").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["max_model_len"], CONTEXT);
    assert_eq!(
        get(s.addr, &format!("/v1/models/{MODEL}")).await.status,
        200
    );
    let r = get(s.addr, "/v1/models/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    assert_eq!(get(s.addr, "/health").await.status, 200);
    let r = get(s.addr, "/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = get(s.addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = r.text();
    assert!(
        text.contains(r#"myriad_gateway_requests_total{endpoint="/v1/models",status="200"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"myriad_gateway_requests_total{endpoint="other",status="404"} 1"#));
    assert!(text.contains("myriad_engine_requests_running 0"));
}

// ---- chat --------------------------------------------------------------------------------------

#[tokio::test]
async fn chat_non_streaming() {
    let s = start().await;
    s.engine.reply("Hello there, friend.", true);
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"temperature": 0, "unknown_field": {"x": 1}})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "Hello there, friend.");
    assert_eq!(choice["finish_reason"], "stop");
    assert!(choice["message"].get("tool_calls").is_none());

    let req = &s.engine.requests()[0];
    let prompt = prompt_text(&s, 0);
    assert_eq!(
        prompt,
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let generated = tokenizer().encode("Hello there, friend.").unwrap().len() + 1;
    assert_eq!(v["usage"]["prompt_tokens"], req.prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], generated);
    assert_eq!(v["usage"]["total_tokens"], req.prompt.len() + generated);
    // No max_tokens: the rest of the context.
    assert_eq!(req.max_tokens, CONTEXT - req.prompt.len());
    assert_eq!(req.sampling.temperature, 0.0);
}

#[tokio::test]
async fn chat_streaming_framing_and_usage() {
    let s = start().await;
    s.engine.reply("Streaming works well.", true);
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"stream": true})),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let chunks = r.chunks();
    let first = &chunks[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(first["choices"][0]["delta"]["content"], "");
    assert!(first["choices"][0]["finish_reason"].is_null());
    let id = first["id"].as_str().unwrap();
    assert!(chunks.iter().all(|c| c["id"] == id && c["model"] == MODEL));
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert_eq!(delta_text(&chunks, "content"), "Streaming works well.");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    // Content arrived in several chunks, not all at once.
    assert!(chunks.len() > 4, "{chunks:?}");

    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    let chunks = r.chunks();
    let (last, rest) = chunks.split_last().unwrap();
    assert!(
        rest.iter()
            .all(|c| c["usage"].is_null() && c.get("usage").is_some())
    );
    assert_eq!(last["choices"], json!([]));
    let generated = tokenizer().encode("Streaming works well.").unwrap().len() + 1;
    assert_eq!(last["usage"]["completion_tokens"], generated);
    assert_eq!(
        last["usage"]["total_tokens"],
        last["usage"]["prompt_tokens"].as_u64().unwrap() + generated as u64
    );

    // stream_options without stream is refused.
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn chat_n_choices_and_seeds() {
    let s = start().await;
    s.engine.reply("Same answer.", true);
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"n": 3, "seed": 41, "max_tokens": 20})),
    )
    .await;
    let v = r.json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["content"], "Same answer.");
    }
    let seeds: Vec<_> = s
        .engine
        .requests()
        .iter()
        .map(|r| r.sampling.seed)
        .collect();
    assert_eq!(seeds, [Some(41), Some(42), Some(43)]);
    assert!(s.engine.requests().iter().all(|r| r.max_tokens == 20));
    let per = tokenizer().encode("Same answer.").unwrap().len() + 1;
    assert_eq!(v["usage"]["completion_tokens"], 3 * per);
    assert_eq!(
        v["usage"]["prompt_tokens"],
        s.engine.requests()[0].prompt.len()
    );

    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"n": 2, "stream": true})),
    )
    .await;
    let chunks = r.chunks();
    for i in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == i)
            .collect();
        assert_eq!(mine[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = mine
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Same answer.");
        assert_eq!(mine.last().unwrap()["choices"][0]["finish_reason"], "stop");
    }
}

#[tokio::test]
async fn chat_length_limit_and_max_completion_tokens() {
    let s = start().await;
    s.engine
        .reply("one two three four five six seven eight nine ten", false);
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"max_completion_tokens": 3, "max_tokens": 50})),
    )
    .await;
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(s.engine.requests()[0].max_tokens, 3);

    // A configured default caps chat requests that name no max_tokens.
    let mut config = config();
    config.default_max_tokens = Some(7);
    let s = start_with(config, None).await;
    post(s.addr, "/v1/chat/completions", &chat_body(json!({}))).await;
    assert_eq!(s.engine.requests()[0].max_tokens, 7);
}

// ---- stop strings and stop tokens --------------------------------------------------------------

#[tokio::test]
async fn stop_strings_cut_text_across_tokens() {
    let s = start().await;
    let text = "The answer is forty two. END of story and more words after it.";
    s.engine.reply(text, true);
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "Q:", "max_tokens": 100, "stop": ["END", "zzz"]}),
    )
    .await;
    let v = r.json();
    assert_eq!(v["choices"][0]["text"], "The answer is forty two. ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], "END");
    // The sequence was cancelled rather than run to the end.
    let used = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!(used < tokenizer().encode(text).unwrap().len());

    // vLLM's include_stop_str_in_output keeps the stop string.
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "Q:", "max_tokens": 100, "stop": "END", "include_stop_str_in_output": true}),
    )
    .await;
    assert_eq!(
        r.json()["choices"][0]["text"],
        "The answer is forty two. END"
    );

    // Streaming: a stop string that spans tokens, and text that only starts like one.
    let stop = "of story";
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"stream": true, "stop": stop})),
    )
    .await;
    let chunks = r.chunks();
    assert_eq!(
        delta_text(&chunks, "content"),
        "The answer is forty two. END "
    );
    assert!(chunks.iter().all(|c| {
        !c["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or("")
            .contains("of")
    }));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(chunks.last().unwrap()["choices"][0]["stop_reason"], stop);
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"stream": true, "stop": "of stork"})),
    )
    .await;
    assert_eq!(delta_text(&r.chunks(), "content"), text);
}

#[tokio::test]
async fn stop_token_ids_end_without_their_text() {
    let s = start().await;
    let tok = tokenizer();
    let ids = tok.encode("alpha beta gamma delta").unwrap();
    let stop_id = ids[2];
    let script = ids.clone();
    s.engine.set_script(move |_| script.clone());
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 50, "stop_token_ids": [stop_id]}),
    )
    .await;
    let v = r.json();
    assert_eq!(
        v["choices"][0]["text"],
        tok.decode(&ids[..2], true).unwrap()
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], stop_id);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(s.engine.requests()[0].stop_token_ids, [stop_id]);

    // ignore_eos is passed through.
    post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "x", "ignore_eos": true}),
    )
    .await;
    assert!(s.engine.requests()[1].ignore_eos);
}

// ---- completions --------------------------------------------------------------------------------

#[tokio::test]
async fn completions_prompt_forms_and_defaults() {
    let s = start().await;
    s.engine
        .reply("a b c d e f g h i j k l m n o p q r s t u v w x y z", false);
    let tok = tokenizer();
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Once upon"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    // OpenAI's default max_tokens is 16.
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert!(v["choices"][0]["logprobs"].is_null());
    assert_eq!(
        s.engine.requests()[0].prompt,
        tok.encode("Once upon").unwrap()
    );

    let ids = tok.encode("token ids").unwrap();
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.json()["usage"]["prompt_tokens"], ids.len());
    assert_eq!(s.engine.requests()[1].prompt, ids);

    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": ["first", "second prompt"], "n": 2, "max_tokens": 1}),
    )
    .await;
    let v = r.json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 4);
    let reqs = s.engine.requests();
    assert_eq!(reqs[2].prompt, reqs[3].prompt);
    assert_eq!(reqs[4].prompt, tok.encode("second prompt").unwrap());
    let expected_prompt =
        tok.encode("first").unwrap().len() + tok.encode("second prompt").unwrap().len();
    assert_eq!(v["usage"]["prompt_tokens"], expected_prompt);
    assert_eq!(v["usage"]["completion_tokens"], 4);
    for (i, c) in v["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(c["index"], i);
    }

    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": [[1, 2], [3]], "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.json()["choices"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn completions_streaming() {
    let s = start().await;
    s.engine.reply("streamed text here", true);
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "x", "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    let chunks = r.chunks();
    let (usage, rest) = chunks.split_last().unwrap();
    assert!(
        rest.iter()
            .all(|c| c["object"] == "text_completion" && c["usage"].is_null())
    );
    let text: String = rest
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "streamed text here");
    assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], "stop");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"]["completion_tokens"],
        tokenizer().encode("streamed text here").unwrap().len() + 1
    );
}

#[tokio::test]
async fn completions_echo_and_logprobs_format() {
    let s = start().await;
    let tok = tokenizer();
    s.engine.reply(" and more", false);
    let prompt = tok.encode("Hello world").unwrap();
    let body =
        json!({"prompt": prompt, "max_tokens": 2, "echo": true, "logprobs": 2, "temperature": 0});
    let r = post(s.addr, "/v1/completions", &body).await;
    let v = r.json();
    let req = &s.engine.requests()[0];
    assert!(req.echo);
    assert_eq!(req.logprobs, Some(2));
    let gen_ids = tok.encode(" and more").unwrap();
    let choice = &v["choices"][0];
    let expect_text = format!("Hello world{}", tok.decode(&gen_ids[..2], true).unwrap());
    assert_eq!(choice["text"], expect_text);
    let lp = &choice["logprobs"];
    let n = prompt.len() + 2;
    for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[field].as_array().unwrap().len(), n, "{field}: {lp}");
    }
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["top_logprobs"][0].is_null());
    assert_eq!(lp["token_logprobs"][1], -0.5);
    assert_eq!(lp["text_offset"][0], 0);
    let tokens: String = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens, expect_text);
    // Offsets are where each token starts in the text.
    let mut offset = 0;
    for (t, o) in lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lp["text_offset"].as_array().unwrap())
    {
        assert_eq!(o.as_u64().unwrap() as usize, offset);
        offset += t.as_str().unwrap().chars().count();
    }
    // top_logprobs: a dict of the 2 most likely (the fake puts the token itself first).
    let top = lp["top_logprobs"][prompt.len()].as_object().unwrap();
    assert_eq!(top.len(), 2);
    assert_eq!(top.values().next().unwrap(), -0.5);
    assert_eq!(
        *top.keys().next().unwrap(),
        tok.decode(&gen_ids[..1], false).unwrap()
    );

    // echo with max_tokens 0 scores the prompt alone.
    let body = json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 0});
    let v = post(s.addr, "/v1/completions", &body).await.json();
    assert_eq!(v["choices"][0]["text"], "Hello world");
    assert_eq!(
        v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        prompt.len()
    );
    assert_eq!(v["usage"]["completion_tokens"], 0);
    // With logprobs 0 only the chosen token is in each dict.
    assert_eq!(
        v["choices"][0]["logprobs"]["top_logprobs"][1]
            .as_object()
            .unwrap()
            .len(),
        1
    );

    // Streaming: the echo first, then the tokens, with logprobs per chunk.
    let body =
        json!({"prompt": prompt, "max_tokens": 2, "echo": true, "logprobs": 1, "stream": true});
    let chunks = post(s.addr, "/v1/completions", &body).await.chunks();
    assert_eq!(chunks[0]["choices"][0]["text"], "Hello world");
    let all_tokens: usize = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["tokens"].as_array())
        .map(|t| t.len())
        .sum();
    assert_eq!(all_tokens, prompt.len() + 2);

    // return_tokens_as_token_ids.
    let body = json!({"prompt": prompt, "max_tokens": 1, "logprobs": 1, "return_tokens_as_token_ids": true});
    let v = post(s.addr, "/v1/completions", &body).await.json();
    assert_eq!(
        v["choices"][0]["logprobs"]["tokens"][0],
        format!("token_id:{}", gen_ids[0])
    );
}

#[tokio::test]
async fn chat_logprobs_format() {
    let s = start().await;
    s.engine.reply("Yes indeed.", true);
    let v = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"logprobs": true, "top_logprobs": 3})),
    )
    .await
    .json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len(),
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    let tok = tokenizer();
    let first_id = tok.encode("Yes indeed.").unwrap()[0];
    let e = &content[0];
    assert_eq!(e["token"], tok.decode(&[first_id], false).unwrap());
    assert_eq!(e["logprob"], -0.5);
    assert_eq!(
        e["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect::<Vec<_>>(),
        tok.decode(&[first_id], false).unwrap().into_bytes()
    );
    let top = e["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    assert!(top[0]["token"].is_string() && top[0]["bytes"].is_array());
    assert_eq!(top[2]["logprob"], -2.5);
    // Without logprobs the field is null.
    let v = post(s.addr, "/v1/chat/completions", &chat_body(json!({})))
        .await
        .json();
    assert!(v["choices"][0]["logprobs"].is_null());

    // Streamed: every token's entry arrives exactly once.
    let chunks = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"logprobs": true, "stream": true})),
    )
    .await
    .chunks();
    let entries: usize = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .map(|a| a.len())
        .sum();
    assert_eq!(entries, tok.encode("Yes indeed.").unwrap().len() + 1);

    let v = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"logprobs": true, "return_tokens_as_token_ids": true})),
    )
    .await
    .json();
    assert_eq!(
        v["choices"][0]["logprobs"]["content"][0]["token"],
        format!("token_id:{first_id}")
    );

    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"top_logprobs": 2})),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"logprobs": true, "top_logprobs": 21})),
    )
    .await;
    assert_eq!(r.status, 400);
}

// ---- tools and reasoning ----------------------------------------------------------------------

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
}

const CALL: &str =
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";

#[tokio::test]
async fn tool_calls_full_and_streamed() {
    let s = start().await;
    s.engine.reply(CALL, true);
    let v = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"tools": weather_tools()})),
    )
    .await
    .json();
    assert!(prompt_text(&s, 0).contains("\"name\": \"get_weather\""));
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));

    let text = format!("Let me look.\n{CALL}");
    s.engine.reply(&text, true);
    let chunks = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"tools": weather_tools(), "tool_choice": "auto", "stream": true})),
    )
    .await
    .chunks();
    assert_eq!(delta_text(&chunks, "content"), "Let me look.\n");
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );
    assert!(
        chunks
            .iter()
            .all(|c| !c.to_string().contains("<tool_call>"))
    );

    // tool_choice "none": no tools in the prompt and the text stays content.
    let v = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"tools": weather_tools(), "tool_choice": "none"})),
    )
    .await
    .json();
    assert!(!prompt_text(&s, 2).contains("get_weather"));
    assert_eq!(v["choices"][0]["message"]["content"], text);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // A named choice must name a tool; tool_choice needs tools.
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"tools": weather_tools(), "tool_choice": named})),
    )
    .await;
    assert_eq!(r.status, 200);
    let bad = json!({"type": "function", "function": {"name": "nope"}});
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"tools": weather_tools(), "tool_choice": bad})),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "tool_choice");
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"tool_choice": "required"})),
    )
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn tool_history_is_rendered() {
    let s = start().await;
    let messages = json!([
        {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]);
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": messages, "tools": weather_tools()}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let prompt = prompt_text(&s, 0);
    assert!(prompt.contains("Weather\nin Paris?"), "{prompt}");
    assert!(prompt.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"), "{prompt}");
    assert!(
        prompt.contains("<tool_response>\nsunny\n</tool_response>"),
        "{prompt}"
    );
    // Images are not supported.
    let messages =
        json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": messages}),
    )
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn reasoning_opened_by_the_model() {
    let s = start().await;
    s.engine
        .reply("<think>\nTwo plus two.\n</think>\n\nIt is 4.", true);
    let v = post(s.addr, "/v1/chat/completions", &chat_body(json!({})))
        .await
        .json();
    let m = &v["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "Two plus two.");
    assert_eq!(m["content"], "It is 4.");
    let chunks = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"stream": true})),
    )
    .await
    .chunks();
    assert_eq!(delta_text(&chunks, "reasoning_content"), "Two plus two.");
    assert_eq!(delta_text(&chunks, "content"), "It is 4.");
    assert!(chunks.iter().all(|c| !c.to_string().contains("think>")));

    // enable_thinking=false reaches the template.
    post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"chat_template_kwargs": {"enable_thinking": false}})),
    )
    .await;
    assert!(prompt_text(&s, 2).ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
}

#[tokio::test]
async fn reasoning_opened_by_the_prompt() {
    // A Qwen3.5-style template that opens <think> in the generation prompt.
    let source = myriad_gateway::CHAT_TEMPLATE.replace(
        "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}",
        "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- else -%}{{- '<think>\\n' -}}{%- endif -%}",
    );
    assert_ne!(
        source,
        myriad_gateway::CHAT_TEMPLATE,
        "template edit did not apply"
    );
    let template = ChatTemplate::new(&source, None, Some("<|im_end|>")).unwrap();
    let s = start_with(config(), Some(template)).await;
    s.engine.reply(
        &format!("I should call the tool.\n</think>\n\n{CALL}"),
        true,
    );
    let v = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"tools": weather_tools()})),
    )
    .await
    .json();
    assert!(prompt_text(&s, 0).ends_with("<think>\n"));
    let m = &v["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "I should call the tool.");
    assert!(m["content"].is_null());
    assert_eq!(m["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");

    let chunks = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"tools": weather_tools(), "stream": true})),
    )
    .await
    .chunks();
    assert_eq!(
        delta_text(&chunks, "reasoning_content"),
        "I should call the tool."
    );
    assert_eq!(delta_text(&chunks, "content"), "");

    // Thinking off: the prompt closes the block and everything is content.
    s.engine.reply("Plain answer.", true);
    let v = post(
        s.addr,
        "/v1/chat/completions",
        &chat_body(json!({"chat_template_kwargs": {"enable_thinking": false}})),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["message"]["content"], "Plain answer.");
    assert!(
        v["choices"][0]["message"]
            .get("reasoning_content")
            .is_none()
    );
}

// ---- errors ------------------------------------------------------------------------------------

async fn expect_error(
    s: &Server,
    path: &str,
    body: &[u8],
    status: u16,
    param: Option<&str>,
) -> Value {
    let r = send(s.addr, "POST", path, &[], body).await;
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("code").is_some() && e.get("param").is_some(), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
    v
}

#[tokio::test]
async fn bad_requests_are_400_with_the_param() {
    let s = start().await;
    let chat = "/v1/chat/completions";
    let body = |extra: Value| chat_body(extra).to_string().into_bytes();
    let v = expect_error(&s, chat, b"{\"messages\": [", 400, None).await;
    assert_eq!(v["error"]["type"], "invalid_request_error");
    expect_error(&s, chat, b"[1, 2]", 400, None).await;
    expect_error(
        &s,
        chat,
        &body(json!({"temperature": -1})),
        400,
        Some("temperature"),
    )
    .await;
    expect_error(
        &s,
        chat,
        &body(json!({"temperature": "hot"})),
        400,
        Some("temperature"),
    )
    .await;
    expect_error(&s, chat, &body(json!({"n": 0})), 400, Some("n")).await;
    expect_error(&s, chat, &body(json!({"n": 1.5})), 400, Some("n")).await;
    expect_error(&s, chat, &body(json!({"top_p": 2})), 400, Some("top_p")).await;
    expect_error(&s, chat, &body(json!({"top_k": -3})), 400, Some("top_k")).await;
    expect_error(
        &s,
        chat,
        &body(json!({"max_tokens": 0})),
        400,
        Some("max_tokens"),
    )
    .await;
    expect_error(&s, chat, &body(json!({"stop": 5})), 400, Some("stop")).await;
    expect_error(
        &s,
        chat,
        &body(json!({"stream": "yes"})),
        400,
        Some("stream"),
    )
    .await;
    expect_error(
        &s,
        chat,
        &body(json!({"messages": []})),
        400,
        Some("messages"),
    )
    .await;
    expect_error(
        &s,
        chat,
        &body(json!({"messages": [{"role": "wizard", "content": "x"}]})),
        400,
        Some("messages[0].role"),
    )
    .await;
    expect_error(
        &s,
        chat,
        &body(json!({"response_format": {"type": "json_object"}})),
        400,
        Some("response_format"),
    )
    .await;
    expect_error(
        &s,
        chat,
        &body(json!({"stop_token_ids": [99999]})),
        400,
        Some("stop_token_ids"),
    )
    .await;
    let c = "/v1/completions";
    expect_error(&s, c, br#"{"prompt": [1, "a"]}"#, 400, Some("prompt")).await;
    expect_error(&s, c, br#"{"prompt": [5000]}"#, 400, Some("prompt")).await;
    expect_error(&s, c, br#"{"prompt": ""}"#, 400, Some("prompt")).await;
    expect_error(
        &s,
        c,
        br#"{"prompt": "x", "logprobs": 50}"#,
        400,
        Some("logprobs"),
    )
    .await;
    expect_error(
        &s,
        c,
        br#"{"prompt": "x", "logprobs": true}"#,
        400,
        Some("logprobs"),
    )
    .await;
    expect_error(&s, c, br#"{}"#, 400, Some("prompt")).await;
    // Nothing reached the engine.
    assert!(s.engine.requests().is_empty());
    // Nulls are "unset".
    let r = post(
        s.addr,
        chat,
        &chat_body(json!({"temperature": null, "stop": null, "n": null})),
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn context_limit_model_and_size_errors() {
    let s = start().await;
    let v = expect_error(
        &s,
        "/v1/chat/completions",
        &chat_body(json!({"max_tokens": 5000}))
            .to_string()
            .into_bytes(),
        400,
        None,
    )
    .await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("maximum context length is 2048 tokens"),
        "{msg}"
    );
    let long = "word ".repeat(3000);
    let v = expect_error(
        &s,
        "/v1/completions",
        json!({"prompt": long}).to_string().as_bytes(),
        400,
        None,
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length")
    );

    let v = expect_error(
        &s,
        "/v1/chat/completions",
        &chat_body(json!({"model": "gpt-4"}))
            .to_string()
            .into_bytes(),
        404,
        Some("model"),
    )
    .await;
    assert_eq!(v["error"]["code"], "model_not_found");

    let mut config = config();
    config.max_body_bytes = 1024;
    let small = start_with(config, None).await;
    let big = chat_body(json!({"messages": [{"role": "user", "content": "x".repeat(4000)}]}));
    let v = expect_error(
        &small,
        "/v1/chat/completions",
        big.to_string().as_bytes(),
        413,
        None,
    )
    .await;
    assert_eq!(v["error"]["code"], "request_too_large");
}

#[tokio::test]
async fn engine_refusals_map_to_statuses() {
    let s = start().await;
    let body = chat_body(json!({})).to_string().into_bytes();
    s.engine.refuse_with(Some(SubmitError::Overloaded {
        waiting: 10,
        retry_after: Duration::from_millis(2500),
    }));
    let r = send(s.addr, "POST", "/v1/chat/completions", &[], &body).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("3"));
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    s.engine.refuse_with(Some(SubmitError::Stopped));
    expect_error(&s, "/v1/chat/completions", &body, 503, None).await;
    s.engine.refuse_with(Some(SubmitError::TooLarge(
        "needs 9 GiB, budget 4 GiB".into(),
    )));
    let v = expect_error(&s, "/v1/completions", br#"{"prompt": "hi"}"#, 400, None).await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs 9 GiB")
    );
    s.engine
        .refuse_with(Some(SubmitError::Invalid("bad".into())));
    expect_error(&s, "/v1/completions", br#"{"prompt": "hi"}"#, 400, None).await;
    s.engine.refuse_with(None);
    let metrics = get(s.addr, "/metrics").await.text();
    assert!(
        metrics.contains(
            r#"myriad_gateway_requests_total{endpoint="/v1/chat/completions",status="429"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"myriad_gateway_requests_total{endpoint="/v1/chat/completions",status="503"} 1"#
    ));
}

#[tokio::test]
async fn engine_failure_mid_stream_sends_an_error_event() {
    let s = start().await;
    // A script that yields an id outside the vocabulary makes detokenisation fail.
    s.engine.set_script(|_| vec![5, 6, 50_000]);
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "x", "stream": true}),
    )
    .await;
    let events = r.sse();
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(last["error"]["message"].is_string(), "{events:?}");
    let r = post(s.addr, "/v1/completions", &json!({"prompt": "x"})).await;
    assert_eq!(r.status, 500);
}

// ---- auth --------------------------------------------------------------------------------------

#[tokio::test]
async fn api_keys() {
    let mut config = config();
    config.api_keys = vec!["sk-one".into(), "sk-two".into()];
    let s = start_with(config, None).await;
    let body = chat_body(json!({})).to_string().into_bytes();
    let path = "/v1/chat/completions";
    let r = send(s.addr, "POST", path, &[], &body).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = send(
        s.addr,
        "POST",
        path,
        &[("Authorization", "Bearer sk-wrong")],
        &body,
    )
    .await;
    assert_eq!(r.status, 401);
    let r = send(
        s.addr,
        "POST",
        path,
        &[("Authorization", "Bearer sk-two")],
        &body,
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(
        s.addr,
        "GET",
        "/v1/models",
        &[("authorization", "bearer sk-one")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(get(s.addr, "/v1/models").await.status, 401);
    // Health and metrics stay open.
    assert_eq!(get(s.addr, "/health").await.status, 200);
    assert_eq!(get(s.addr, "/metrics").await.status, 200);
}

// ---- cancellation and metrics --------------------------------------------------------------

#[tokio::test]
async fn client_disconnect_cancels_the_sequence() {
    let s = start().await;
    s.engine.reply("tick tock ", false);
    s.engine.forever.store(true, Ordering::SeqCst);
    s.engine.set_delay(Duration::from_millis(5));
    let body = chat_body(json!({"stream": true, "max_tokens": 1000}));
    let mut stream = open(s.addr, "/v1/chat/completions", &body).await;
    // Read until a few content events have arrived.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen)
        .matches("\"content\"")
        .count()
        < 4
    {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(s.engine.cancelled.load(Ordering::SeqCst), 0);
    assert_eq!(s.state.metrics().in_flight(), 1);
    drop(stream);
    eventually("the fake to see its receiver dropped", || {
        s.engine.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    eventually("the request to leave the in-flight gauge", || {
        s.state.metrics().in_flight() == 0
    })
    .await;
    assert_eq!(s.engine.finished.load(Ordering::SeqCst), 0);

    // A non-streaming request whose client goes away is cancelled too.
    let stream = open(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 1000}),
    )
    .await;
    eventually("the second submission", || s.engine.requests().len() == 2).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    drop(stream);
    eventually("the second cancellation", || {
        s.engine.cancelled.load(Ordering::SeqCst) == 2
    })
    .await;
}

#[tokio::test]
async fn metrics_count_tokens_and_latencies() {
    let s = start().await;
    s.engine.reply("some tokens out", true);
    s.engine.set_delay(Duration::from_millis(1));
    post(s.addr, "/v1/chat/completions", &chat_body(json!({}))).await;
    post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "abc", "stream": true}),
    )
    .await;
    let text = get(s.addr, "/metrics").await.text();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    };
    let per = (tokenizer().encode("some tokens out").unwrap().len() + 1) as f64;
    assert_eq!(value("myriad_gateway_generation_tokens_total"), 2.0 * per);
    let prompts: usize = s.engine.requests().iter().map(|r| r.prompt.len()).sum();
    assert_eq!(value("myriad_gateway_prompt_tokens_total"), prompts as f64);
    assert_eq!(
        value("myriad_gateway_time_to_first_token_seconds_count"),
        2.0
    );
    assert_eq!(
        value("myriad_gateway_inter_token_latency_seconds_count"),
        2.0 * (per - 1.0)
    );
    assert!(value("myriad_gateway_time_to_first_token_seconds_sum") > 0.0);
    assert_eq!(value("myriad_gateway_request_latency_seconds_count"), 2.0);
    assert_eq!(value("myriad_gateway_requests_in_flight"), 0.0);
    assert!(
        text.contains(
            r#"myriad_gateway_requests_total{endpoint="/v1/completions",status="200"} 1"#
        )
    );
}
