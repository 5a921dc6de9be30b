"""Regenerates jinja2_cases.json: chat-template renderings by Jinja2 set up as transformers sets
it up (transformers/utils/chat_template_utils.py: ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, loop controls, its json.dumps-based `tojson`, `raise_exception`
and `strftime_now`). The Rust renderer must reproduce every `expected` byte for byte and raise
every `error`. Made with Jinja2 3.1.6:  python3 make_jinja2_cases.py  (in this folder).
"""
import json
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from datetime import datetime

def raise_exception(m): raise jinja2.exceptions.TemplateError(m)
def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
env.filters['tojson'] = tojson
env.globals['raise_exception'] = raise_exception
env.globals['strftime_now'] = lambda f: datetime.now().strftime(f)

tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather — «now» for a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 1e3}, "ratio": {"type": "number", "default": 0.5}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "noop", "parameters": {}}}]
args = {"city": "Paris", "days": 3, "metric": True, "off": False, "ratio": 0.5, "big": 1e20, "tiny": 1e-7, "whole": 2.0, "tags": ["a", "b'c"], "opts": {"x": None, "y": "é\n\"q\""}, "none": None, "empty": "", "multi": "line1\nline2"}
convs = [
    ([{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi there!"}], None, True, {}),
    ([{"role": "user", "content": "Say hi."}], None, True, {"enable_thinking": False}),
    ([{"role": "user", "content": "Say hi."}], None, True, {"enable_thinking": True}),
    ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "  Simple.  "}, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n6"}], None, False, {}),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
      {"role": "assistant", "content": "Let me check.", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": args}}, {"name": "noop", "arguments": {}}]},
      {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "ok"},
      {"role": "assistant", "content": "", "reasoning_content": "got it", "tool_calls": [{"function": {"name": "noop", "arguments": {"n": 1}}}]},
      {"role": "tool", "content": [{"type": "text", "text": "done"}]}], tools, True, {}),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}, {"type": "video"}, {"image_url": "x"}]}], None, True, {"add_vision_id": True}),
    ([{"role": "user", "content": None}, {"role": "user", "content": "x"}], [], True, {}),
    ([{"role": "assistant", "content": "no user"}], None, True, {}),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], None, True, {}),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], None, True, {}),
    ([{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "a"}], None, True, {}),
]
torture = [
    ([{"role": "user", "content": "Hello banana"}, {"role": "assistant", "content": "!! wow such   text !!"}, {"role": "tool", "content": "é", "n": [1, 2.0, None, True], "f": 1e16}], tools, True, {"extra_kw": "given"}),
    ([{"role": "user", "content": "xyz"}], None, False, {}),
    ([{"role": "user", "content": "boom"}], None, False, {}),
]
# transformers passes `{**tokenizer.special_tokens_map, **kwargs}`: only the tokens that are set
# (no bos_token for Qwen).
special_tokens_map = {"eos_token": "<|im_end|>"}
cases = []
here = Path(__file__).resolve().parent
for name, path, conv in [("python_isms", here / "python_isms.jinja", torture), ("fixture", None, convs)]:
    if path:
        src = open(path).read()
    else:
        src = json.load(open(here / '../../../../shared/fixtures/qwen3_5_moe-tiny/tokenizer_config.json'))['chat_template']
    t = env.from_string(src)
    for i, (msgs, tl, agp, kw) in enumerate(conv):
        case = {"name": f"{name}-{i}", "template": src, "messages": msgs, "tools": tl, "add_generation_prompt": agp, "kwargs": kw}
        try:
            case["expected"] = t.render(messages=msgs, tools=tl, documents=None, add_generation_prompt=agp, **{**special_tokens_map, **kw})
        except Exception as e:
            case["error"] = f"{type(e).__name__}: {e}"
        cases.append(case)
(here / 'jinja2_cases.json').write_text(json.dumps(cases, ensure_ascii=False, indent=1) + '\n')
for c in cases: print(c["name"], "ERROR " + c["error"] if "error" in c else len(c["expected"]))
