"""Drives a running `myriad serve` with the official `openai` Python package.

Usage: python check_openai.py BASE_URL API_KEY MODEL_NAME
Exits non-zero (with the failing check named) if any behaviour differs from the OpenAI API.
Run by `tests/tests/openai_client.rs`, which starts the server; `.ci/run` installs the package.
"""

import json
import sys

import openai
from openai import OpenAI

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)
checks = 0


def check(cond, what):
    global checks
    checks += 1
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


# Models
models = client.models.list()
check(any(m.id == model for m in models.data), f"/v1/models lists {model}")

# Chat, non-streaming
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=8,
    temperature=0,
    extra_body={"ignore_eos": True},
)
check(r.object == "chat.completion", "chat object")
check(len(r.choices) == 1 and r.choices[0].message.role == "assistant", "one assistant choice")
check(r.choices[0].finish_reason == "length", "finish_reason length with ignore_eos")
check(r.usage.completion_tokens == 8, "usage.completion_tokens")
check(r.usage.total_tokens == r.usage.prompt_tokens + 8, "usage.total_tokens")
greedy_content = r.choices[0].message.content or ""
greedy_reasoning = getattr(r.choices[0].message, "reasoning_content", None) or ""

# Chat, streaming, with usage; greedy is deterministic, so it matches the non-streamed text
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"ignore_eos": True},
)
content, reasoning, finish, usage, roles = [], [], None, None, []
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.role:
            roles.append(c.delta.role)
        if c.delta.content:
            content.append(c.delta.content)
        rc = getattr(c.delta, "reasoning_content", None)
        if rc:
            reasoning.append(rc)
        if c.finish_reason:
            finish = c.finish_reason
check(roles[:1] == ["assistant"], "first streamed delta carries the role")
check(finish == "length", "streamed finish_reason")
check(usage is not None and usage.completion_tokens == 8, "include_usage chunk")
check("".join(content) == greedy_content, "streamed content equals the non-streamed content")
check("".join(reasoning) == greedy_reasoning, "streamed reasoning equals the non-streamed one")

# n choices with a seed are reproducible
a = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
    temperature=1.0, seed=7, n=2, extra_body={"ignore_eos": True},
)
b = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
    temperature=1.0, seed=7, n=2, extra_body={"ignore_eos": True},
)
check([c.index for c in a.choices] == [0, 1], "n=2 gives choices 0 and 1")
check([c.message.content for c in a.choices] == [c.message.content for c in b.choices],
      "a seed makes sampling reproducible")

# Chat logprobs
r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
    temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
)
lp = r.choices[0].logprobs.content
check(len(lp) == 4, "one logprob entry per generated token")
check(all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in lp), "top_logprobs of 3, logprob <= 0")
check(all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in lp), "top-1 is the most likely")

# Completions with a token-id prompt, echo and logprobs
r = client.completions.create(
    model=model, prompt=[1, 2, 3, 4], max_tokens=3, temperature=0, echo=True, logprobs=2,
    extra_body={"ignore_eos": True},
)
c = r.choices[0]
check(r.object == "text_completion", "completions object")
check(len(c.logprobs.tokens) == 4 + 3, "echo: prompt and generated tokens")
check(c.logprobs.token_logprobs[0] is None, "the first prompt position has no logprob")
check(all(x <= 0 for x in c.logprobs.token_logprobs[1:]), "logprobs <= 0")
check(r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 3, "completions usage")

# Completions streaming
text = "".join(
    ch.choices[0].text
    for ch in client.completions.create(
        model=model, prompt="Once upon", max_tokens=5, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    if ch.choices
)
full = client.completions.create(
    model=model, prompt="Once upon", max_tokens=5, temperature=0, extra_body={"ignore_eos": True},
).choices[0].text
check(text == full, "streamed completion equals the non-streamed one")

# Stop strings cut the text and end with finish_reason stop
if len(full) >= 3:
    stop = full[1:3]
    r = client.completions.create(
        model=model, prompt="Once upon", max_tokens=5, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True},
    )
    check(r.choices[0].finish_reason == "stop", "a stop string ends with finish_reason stop")
    check(stop not in r.choices[0].text and full.startswith(r.choices[0].text),
          "the text is cut before the stop string")

# Tools: the request is accepted with tools; any tool call comes back well-formed
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    tools=[{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}],
    tool_choice="auto", max_tokens=8, temperature=0,
)
for call in r.choices[0].message.tool_calls or []:
    check(call.type == "function" and isinstance(json.loads(call.function.arguments), dict),
          "tool calls are functions with JSON arguments")

# Reasoning switch is accepted
r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
    extra_body={"chat_template_kwargs": {"enable_thinking": False}},
)
check(r.choices[0].message.role == "assistant", "enable_thinking=false accepted")

# Errors, with OpenAI's statuses and error objects
def expect(status, fn, what):
    try:
        fn()
    except openai.APIStatusError as e:
        check(e.status_code == status, f"{what}: status {e.status_code}, expected {status}")
        body = e.response.json()
        check("error" in body and body["error"].get("message"), f"{what}: OpenAI error object")
        return
    check(False, f"{what}: no error")

expect(400, lambda: client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hi"}], temperature=-1), "temperature -1")
expect(400, lambda: client.completions.create(
    model=model, prompt=[1, 2, 3], max_tokens=100_000_000), "prompt + max_tokens over the context")
expect(404, lambda: client.chat.completions.create(
    model="no-such-model", messages=[{"role": "user", "content": "Hi"}]), "unknown model")
bad = OpenAI(base_url=base, api_key="wrong-key", max_retries=0)
expect(401, lambda: bad.models.list(), "wrong API key")

print(f"openai client: {checks} checks passed")
