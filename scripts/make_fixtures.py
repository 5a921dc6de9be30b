#!/usr/bin/env python3
"""Build tiny random-weight Qwen3-Next / Qwen3.5-MoE checkpoints plus reference outputs.

(Myriad's copy of shared/fixtures/make_fixtures.py, with one change: a shape JSON may give
`rope_scaling`, merged into the rope parameters, to make fixtures with YaRN on; see
tests/fixtures/README.md.)

This script is the *oracle* side of the engine's correctness tests.  It uses the Hugging Face
`transformers` implementation of the two hybrid architectures (Gated DeltaNet linear attention
interleaved with gated full attention, sparse MoE with a gated shared expert), running on the CPU
in float32, to produce:

  * a Hugging Face style model directory (config.json, safetensors weights in the same tensor
    layout as the official checkpoints, generation_config.json, a small byte-level BPE tokenizer
    with Qwen-style special tokens and chat template), and
  * reference outputs for fixed token-id prompts (full-sequence logits, greedy continuations made
    with the KV / recurrent cache, per-layer activations, router decisions, cache states, a
    left-padded batch, and the same prompts run in bfloat16).

Nothing is downloaded: model weights are random (but deterministic, see `init_weights`), and the
tokenizer is trained on text files from the running Python's standard library.

Sub-commands (run with `--help` for all options):

  generate   build one fixture directory
  bench      time transformers' own CPU prefill / greedy decode on a larger random model
             (nothing is written to disk)

Example (the commands used for the published fixtures are listed in README.md):

  python make_fixtures.py generate --arch qwen3_next --config tiny --seed 0 \
      --prompt-set public --out fixtures/qwen3_next-tiny
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import sys
import sysconfig
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

# -----------------------------------------------------------------------------------------------
# Shapes
# -----------------------------------------------------------------------------------------------
# Every preset is architecture-neutral: the same numbers are used for `qwen3_next` and for the
# text tower of `qwen3_5_moe`.  All layers are MoE layers (as in the released models), and the
# layer pattern is "every `full_attention_interval`-th layer is full attention, the rest are
# Gated DeltaNet", again as in the released models.
PRESETS: dict[str, dict] = {
    # ~1.4 MB of bf16 weights.  3 linear-attention layers + 1 full-attention layer.
    "tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        num_hidden_layers=4,
        full_attention_interval=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        partial_rotary_factor=0.25,  # rotary dim 8
        rope_theta=10000.0,  # small theta so every rotary frequency turns noticeably in 200 tokens
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=64,
        num_experts_per_tok=4,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=32,
        # what to keep in reference.safetensors (the tiny fixture has a ~2 MB budget): no bf16
        # logits, and ("lean") per-step greedy logits only for prompts 1 and the longest one, and no
        # logits at all for the chat-template prompt (its ids and greedy ids are kept).
        store_bf16_logits=False,
        lean=True,
    ),
    # Same expert count / top-k as Qwen3-Next-80B-A3B and Qwen3.5-397B-A17B (512 experts, top-10)
    # so that expert indexing, sharding and the fused expert tensors are exercised at full width.
    # The per-expert width is tiny to keep the directory under ~20 MB.
    "mini512": dict(
        vocab_size=2048,
        hidden_size=128,
        num_hidden_layers=4,
        full_attention_interval=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        partial_rotary_factor=0.25,  # rotary dim 16
        rope_theta=10000000.0,  # as in the released models
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
        num_experts=512,
        num_experts_per_tok=10,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=64,
        store_bf16_logits=[1, 2],  # the 7- and 33-token prompts only (size budget)
        shard_mb=5.0,  # write a sharded checkpoint with model.safetensors.index.json, like real ones
    ),
    # Performance peer only (see the `bench` sub-command).  About 3.3 G parameters, 13 GB in f32:
    # do not generate it into the repository.
    "bench": dict(
        vocab_size=32768,
        hidden_size=1024,
        num_hidden_layers=8,
        full_attention_interval=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        partial_rotary_factor=0.25,
        rope_theta=10000000.0,
        linear_num_key_heads=8,
        linear_num_value_heads=16,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        num_experts=512,
        num_experts_per_tok=10,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=256,
        store_bf16_logits=False,
    ),
}

# Prompt sets: lengths of the random token-id prompts, the seed of the generator that draws them,
# which prompt gets the per-layer capture, which two form the padded batch, and candidate user
# messages for the chat-template prompt.  64 is the chunk size of transformers' chunked
# gated-delta-rule, so 33 stays in one chunk and 130 = 64 + 64 + 2 crosses two boundaries.
# Further sets (and further shapes) can be supplied as JSON files: see --prompt-set-json and
# --shape-json.
PROMPT_SETS = {
    "public": dict(lengths=[1, 7, 33, 130], seed=1234, debug_index=2, batch_pair=(1, 2),
                   chat_user=["Write a haiku about linear attention.", "What is the capital of France?",
                              "Explain recursion to a child.", "Name a color.", "Translate 'cat' into French.",
                              "Give me a fun fact about octopuses."]),
}
NUM_GREEDY = 16  # tokens generated greedily after every prompt
# A random prompt is redrawn (up to MAX_PROMPT_DRAWS times) until every one of its greedy steps has
# a top-1 / top-2 logit margin of at least MIN_GREEDY_MARGIN, so that an engine whose float32
# rounding differs from PyTorch's by ~1e-4 still picks the same tokens.
MIN_GREEDY_MARGIN = 0.02
# Likewise for the routers: the k-th and (k+1)-th router logits of every token (prompt and greedy
# continuation, every layer) must differ by at least MIN_ROUTER_GAP, so that float32 rounding
# differences cannot swap an expert in or out of the top-k.
MIN_ROUTER_GAP = 1e-4
MAX_PROMPT_DRAWS = 40

# Special tokens, in the order Qwen tokenizers append them after the byte-level BPE vocabulary.
# (content, is_special): Qwen marks the chat-control tokens special and the think / tool tags as
# ordinary added tokens (never split, but kept by `skip_special_tokens=True` decoding).
SPECIAL_TOKENS_COMMON = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
]
SPECIAL_TOKENS_VISION = [  # only in the qwen3_5_moe tokenizer (its config refers to them)
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
]
SPECIAL_TOKENS_TAGS = [
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]

# Pre-tokenizer split patterns.  Qwen3.5 extends the letter classes with combining marks (\p{M}).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN35_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Standard-library files used as the tokenizer training corpus (relative to the stdlib folder).
# Files that are missing on a given Python are skipped; the list actually used and the sha256 of
# every file are recorded in reference.json.
TOKENIZER_CORPUS = [
    "LICENSE.txt",
    "argparse.py",
    "textwrap.py",
    "difflib.py",
    "string.py",
    "functools.py",
    "dataclasses.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "html/entities.py",  # plenty of non-ASCII characters
    "calendar.py",
    "pathlib.py",
    "heapq.py",
]

# A Qwen-style chat template (ChatML turns, optional tools block in the system turn, <think>
# handling for assistant turns and the `enable_thinking=false` generation prompt).  Written for
# this project; it only uses Jinja features that minijinja also supports.
CHAT_TEMPLATE = r"""{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is none -%}
{%- else -%}{%- for part in content -%}
{%- if part.type == 'text' -%}{{ part.text }}
{%- elif part.type == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>
{%- elif part.type == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>
{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- set has_system = messages and messages[0].role == 'system' -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if has_system -%}{{- render_content(messages[0].content) + '\n\n' -}}{%- endif -%}
{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
{%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif has_system -%}
{{- '<|im_start|>system\n' + render_content(messages[0].content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role == 'user' -%}
{{- '<|im_start|>user\n' + render_content(message.content) + '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{{- '<|im_start|>assistant\n' -}}
{%- if message.reasoning_content -%}{{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' -}}{%- endif -%}
{{- render_content(message.content) -}}
{%- if message.tool_calls -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function else call -%}
{%- if (loop.first and message.content) or not loop.first -%}{{- '\n' -}}{%- endif -%}
{%- set args_json = fn.arguments if fn.arguments is string else (fn.arguments | tojson) -%}
{{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' + args_json + '}\n</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + render_content(message.content) + '\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}"""


# -----------------------------------------------------------------------------------------------
# Small helpers
# -----------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[make_fixtures] {msg}", flush=True)


def versions() -> dict:
    import safetensors
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def special_token_list(arch: str) -> list[tuple[str, bool]]:
    extra = SPECIAL_TOKENS_VISION if arch == "qwen3_5_moe" else []
    return SPECIAL_TOKENS_COMMON + extra + SPECIAL_TOKENS_TAGS


def mrope_sections(rotary_dim: int) -> list[int]:
    """Split the rotary frequency count into (t, h, w) parts the way the release does (32 -> 11,11,10)."""
    n = rotary_dim // 2
    base, rem = divmod(n, 3)
    return [base + (rem > 0), base + (rem > 1), base]


def token_ids(vocab_size: int, arch: str) -> dict[str, int]:
    """Ids of the special tokens: they follow the regular vocabulary, which fills the rest."""
    specials = special_token_list(arch)
    first = vocab_size - len(specials)
    return {tok: first + i for i, (tok, _) in enumerate(specials)}


# -----------------------------------------------------------------------------------------------
# transformers configuration objects
# -----------------------------------------------------------------------------------------------
def layer_types_for(shape: dict) -> list[str]:
    k = shape["full_attention_interval"]
    return ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(shape["num_hidden_layers"])]


def text_config_kwargs(shape: dict, arch: str) -> dict:
    """Keyword arguments shared by Qwen3NextConfig and Qwen3_5MoeTextConfig."""
    ids = token_ids(shape["vocab_size"], arch)
    rotary_dim = int(shape["head_dim"] * shape["partial_rotary_factor"])
    rope = {
        "rope_type": "default",
        "rope_theta": shape["rope_theta"],
        "partial_rotary_factor": shape["partial_rotary_factor"],
    }
    # Myriad's copy: a shape may add RoPE scaling (e.g. YaRN: {"rope_type": "yarn", "factor": 4.0,
    # "original_max_position_embeddings": 64}) to the rope parameters.
    rope.update(shape.get("rope_scaling", {}))
    if arch == "qwen3_5_moe":
        # The text model of Qwen3.5 uses interleaved multimodal RoPE.  For text-only input the three
        # position streams are identical, which makes it equal to ordinary (partial) RoPE.
        rope["mrope_section"] = mrope_sections(rotary_dim)
        rope["mrope_interleaved"] = True
    kw = dict(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"],
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        rope_parameters=rope,
        linear_conv_kernel_dim=shape["linear_conv_kernel_dim"],
        linear_key_head_dim=shape["linear_key_head_dim"],
        linear_value_head_dim=shape["linear_value_head_dim"],
        linear_num_key_heads=shape["linear_num_key_heads"],
        linear_num_value_heads=shape["linear_num_value_heads"],
        moe_intermediate_size=shape["moe_intermediate_size"],
        shared_expert_intermediate_size=shape["shared_expert_intermediate_size"],
        num_experts=shape["num_experts"],
        num_experts_per_tok=shape["num_experts_per_tok"],
        layer_types=layer_types_for(shape),
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=None,
    )
    if arch == "qwen3_next":
        kw.update(
            norm_topk_prob=True,  # Qwen3.5 always renormalises, Qwen3-Next has it as a flag
            decoder_sparse_step=1,
            mlp_only_layers=[],
            intermediate_size=4 * shape["hidden_size"],  # dense-MLP width; unused (every layer is MoE)
        )
    return kw


def build_config(shape: dict, arch: str):
    if arch == "qwen3_next":
        from transformers import Qwen3NextConfig

        return Qwen3NextConfig(**text_config_kwargs(shape, arch))
    from transformers import Qwen3_5MoeConfig

    ids = token_ids(shape["vocab_size"], arch)
    # A minimal vision tower, only so that the checkpoint has the same top-level structure
    # (model.visual.* next to model.language_model.*) as the released image-text checkpoints.
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        in_channels=3,
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=shape["hidden_size"],
        num_position_embeddings=16,
    )
    return Qwen3_5MoeConfig(
        text_config=text_config_kwargs(shape, arch),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_model(shape: dict, arch: str):
    """Instantiate the full model class that matches the released checkpoints' layout."""
    cfg = build_config(shape, arch)
    if arch == "qwen3_next":
        from transformers import Qwen3NextForCausalLM

        return Qwen3NextForCausalLM(cfg)
    from transformers import Qwen3_5MoeForConditionalGeneration

    return Qwen3_5MoeForConditionalGeneration(cfg)


# -----------------------------------------------------------------------------------------------
# Deterministic weight initialisation
# -----------------------------------------------------------------------------------------------
def _gen(seed: int, name: str) -> torch.Generator:
    # One generator per tensor, keyed by (seed, tensor name), so values do not depend on the order
    # in which transformers happens to register parameters.
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    return g


def _normal(shape, std, g):
    return torch.randn(shape, generator=g, dtype=torch.float32) * std


def _uniform(shape, lo, hi, g):
    return torch.rand(shape, generator=g, dtype=torch.float32) * (hi - lo) + lo


@torch.no_grad()
def init_weights(model, seed: int) -> dict:
    """Give every parameter a deterministic, non-degenerate value.

    The defaults transformers uses for training (zeros for the zero-centred norms, ones for
    dt_bias, 0.02-std matrices) would hide whole classes of bugs: a forgotten "+1" on an RMSNorm
    weight, a missing dt_bias, a shared-expert gate stuck at 0.5, ...  So:

    * matrices: N(0, 1/fan_in), i.e. unit-variance activations; the router and the shared-expert
      gate get a larger spread so that top-k choices and sigmoid gates are well separated;
    * zero-centred RMSNorm weights (decoder norms, final norm, q/k norms; applied as 1 + w):
      uniform in [-0.4, 0.4];
    * the plain-weight gated RMSNorm inside Gated DeltaNet: uniform in [0.6, 1.4];
    * A_log: per value head, spread over log(0.005) .. log(4) so that some heads forget within a
      few tokens and others remember across several 64-token chunks; dt_bias uniform in [-1.5, 1];
    * depthwise conv taps: N(0, 1/kernel);
    * the vision tower (unused by the text reference) gets small random values.

    Everything except A_log is then rounded to bfloat16, so the bf16 checkpoint holds exactly the
    values the float32 reference was computed with.  A_log is kept in float32 (released
    checkpoints store it as F32 too) and written as F32.
    """
    stats = {}
    for name, p in model.named_parameters():
        g = _gen(seed, name)
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        if ".visual." in name or name.startswith("visual."):
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
                val = 1.0 + _normal(shape, 0.1, g)
            elif p.dim() == 1:
                val = _normal(shape, 0.02, g)
            else:
                fan_in = int(np.prod(shape[1:]))
                val = _normal(shape, 1.0 / math.sqrt(fan_in), g)
        elif name.endswith("embed_tokens.weight"):
            val = _normal(shape, 1.0, g)
        elif name.endswith("lm_head.weight"):
            val = _normal(shape, 2.0 / math.sqrt(shape[1]), g)
        elif leaf == "A_log":
            n = shape[0]
            grid = torch.linspace(math.log(0.005), math.log(4.0), n)
            perm = torch.randperm(n, generator=g)
            val = grid[perm] + _uniform(shape, -0.1, 0.1, g)
        elif leaf == "dt_bias":
            val = _uniform(shape, -1.5, 1.0, g)
        elif name.endswith("linear_attn.norm.weight"):
            val = _uniform(shape, 0.6, 1.4, g)
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            # input_layernorm, post_attention_layernorm, model.norm, q_norm, k_norm: zero-centred
            val = _uniform(shape, -0.4, 0.4, g)
        elif name.endswith("conv1d.weight"):
            val = _normal(shape, 1.0 / math.sqrt(shape[-1]), g)
        elif name.endswith("mlp.gate.weight"):  # router
            val = _normal(shape, 1.5 / math.sqrt(shape[1]), g)
        elif name.endswith("shared_expert_gate.weight"):
            val = _normal(shape, 1.5 / math.sqrt(shape[1]), g)
        elif name.endswith("experts.gate_up_proj"):  # [E, 2I, H]
            val = _normal(shape, 1.0 / math.sqrt(shape[2]), g)
        elif name.endswith("experts.down_proj"):  # [E, H, I]
            val = _normal(shape, 1.0 / math.sqrt(shape[2]), g)
        elif p.dim() == 2:
            val = _normal(shape, 1.0 / math.sqrt(shape[1]), g)
        elif p.dim() == 1:
            val = _normal(shape, 0.1, g)
        else:
            raise RuntimeError(f"no init rule for {name} {shape}")
        if leaf != "A_log":
            val = val.to(torch.bfloat16).to(torch.float32)
        p.copy_(val)
        stats[name] = [float(val.mean()), float(val.std()) if val.numel() > 1 else 0.0]
    return stats


# -----------------------------------------------------------------------------------------------
# Checkpoint writing (official tensor layouts)
# -----------------------------------------------------------------------------------------------
def checkpoint_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """Map the in-memory parameters to the tensor names / layout of the released checkpoints.

    transformers >= 5 keeps the routed experts of both architectures fused in memory:
    `experts.gate_up_proj` [E, 2*I, H] (gate rows first, then up rows) and `experts.down_proj`
    [E, H, I].  On disk:

    * Qwen3-Next (Qwen/Qwen3-Next-80B-A3B-*) stores one tensor per expert and projection:
      `model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`.
    * Qwen3.5-MoE (Qwen/Qwen3.5-35B-A3B, -397B-A17B) stores the fused tensors as they are, under
      `model.language_model.layers.{l}.mlp.experts.{gate_up_proj,down_proj}` (no `.weight`).
    """
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        t = t.detach().contiguous()
        if arch == "qwen3_next" and name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif arch == "qwen3_next" and name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, weights_dtype: str, shard_mb: float | None):
    from safetensors.torch import save_file

    def cast(name, t):
        if weights_dtype == "f32" or name.endswith("A_log"):
            return t.to(torch.float32).contiguous()
        return t.to(torch.bfloat16).contiguous()

    casted = {k: cast(k, v) for k, v in sorted(tensors.items())}
    meta = {"format": "pt"}
    if not shard_mb:
        save_file(casted, str(out_dir / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    # Greedy sharding in name order, the way `save_pretrained(max_shard_size=...)` splits files.
    limit = int(shard_mb * 1024 * 1024)
    shards, cur, cur_bytes = [], {}, 0
    for k, v in casted.items():
        nbytes = v.numel() * v.element_size()
        if cur and cur_bytes + nbytes > limit:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k] = v
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    weight_map, files, total = {}, [], 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata=meta)
        files.append(fname)
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files + ["model.safetensors.index.json"]


def write_config(model, shape: dict, arch: str, out_dir: Path, weights_dtype: str) -> dict:
    """config.json in transformers-5 form plus the keys the released configs carry.

    transformers 5 serialises RoPE as a `rope_parameters` dict and the layer pattern as an explicit
    `layer_types` list.  The released Qwen3-Next config.json predates that and instead has
    top-level `rope_theta`, `partial_rotary_factor` and `full_attention_interval`; the Qwen3.5
    text_config carries both forms plus `attn_output_gate`, `mamba_ssm_dtype` and MTP settings.
    We write both spellings (consistently) so a loader written against either form works;
    transformers reads the file back to the identical configuration (checked in `verify_load`).
    """
    # Same serialisation as `save_pretrained` (only non-default attributes, nested sub-configs).
    d = json.loads(model.config.to_json_string(use_diff=True))
    d.pop("transformers_version", None)
    import transformers

    d["transformers_version"] = transformers.__version__
    dtype_name = "bfloat16" if weights_dtype == "bf16" else "float32"
    legacy = {
        "rope_theta": shape["rope_theta"],
        "partial_rotary_factor": shape["partial_rotary_factor"],
        "full_attention_interval": shape["full_attention_interval"],
    }
    if arch == "qwen3_next":
        d.update(legacy)
        d["architectures"] = ["Qwen3NextForCausalLM"]
        d["dtype"] = dtype_name
    else:
        tc = d["text_config"]
        tc.update(legacy)
        tc.update(
            {
                "attn_output_gate": True,
                "mamba_ssm_dtype": "float32",
                # The release has one MTP layer (weights under `mtp.*`).  transformers has no MTP
                # module and drops those weights on load, so these fixtures contain none.
                "mtp_num_hidden_layers": 0,
                "mtp_use_dedicated_embeddings": False,
                "dtype": dtype_name,
            }
        )
        d["architectures"] = ["Qwen3_5MoeForConditionalGeneration"]
        d["dtype"] = dtype_name
    d = json.loads(json.dumps(d))  # plain JSON types only
    (out_dir / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    return d


def write_generation_config(shape: dict, arch: str, out_dir: Path) -> dict:
    import transformers

    ids = token_ids(shape["vocab_size"], arch)
    # Same shape as the released Instruct generation_config.json (sampling defaults included).
    # The references below are greedy with EOS ignored: they do NOT follow these settings.
    gc = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "transformers_version": transformers.__version__,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(gc, indent=2) + "\n")
    return gc


# -----------------------------------------------------------------------------------------------
# Tokenizer
# -----------------------------------------------------------------------------------------------
def tokenizer_corpus() -> tuple[list[str], list[dict]]:
    std = Path(sysconfig.get_paths()["stdlib"])
    texts, used = [], []
    for rel in TOKENIZER_CORPUS:
        p = std / rel
        if not p.is_file():
            continue
        data = p.read_bytes()
        texts.append(data.decode("utf-8", errors="replace"))
        used.append({"file": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    # A few chat-shaped lines so role names and common chat words get merges of their own.
    chat = []
    for role, text in [
        ("system", "You are a helpful assistant."),
        ("user", "Write a haiku about linear attention."),
        ("assistant", "Sure! Here is a short poem about recurrent state and memory."),
        ("user", "What is the capital of France? Please answer in one word."),
        ("assistant", "Paris."),
        ("tool", '{"temperature": 21, "unit": "celsius"}'),
    ]:
        chat.append(f"{role}\n{text}\n")
    texts.append("".join(chat) * 20)
    used.append({"file": "<built-in chat snippets>", "sha256": None, "bytes": len(texts[-1])})
    return texts, used


def train_tokenizer(vocab_size: int, arch: str):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = special_token_list(arch)
    n_regular = vocab_size - len(specials)
    split = QWEN35_SPLIT_REGEX if arch == "qwen3_5_moe" else QWEN2_SPLIT_REGEX
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=n_regular,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    texts, used = tokenizer_corpus()
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != n_regular:
        raise RuntimeError(f"BPE training produced {tok.get_vocab_size()} tokens, wanted {n_regular}")
    expected = token_ids(vocab_size, arch)
    for content, special in specials:
        at = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        if special:
            tok.add_special_tokens([at])
        else:
            tok.add_tokens([at])
        assert tok.token_to_id(content) == expected[content], content
    assert tok.get_vocab_size() == vocab_size
    return tok, used


def write_tokenizer(tok, arch: str, vocab_size: int, out_dir: Path) -> None:
    tok.save(str(out_dir / "tokenizer.json"))
    ids = token_ids(vocab_size, arch)
    added = {}
    for content, special in special_token_list(arch):
        added[str(ids[content])] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [c for c, s in special_token_list(arch) if s and c not in ("<|endoftext|>",)],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer" if arch == "qwen3_next" else "Qwen3_5Tokenizer",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


TOKENIZER_TEXTS = [
    "Hello, world!",
    "def add(a, b):\n    return a + b\n",
    "  leading spaces, trailing tabs\t\t\nand\r\nCRLF lines\n\n\n",
    "Numbers: 12345 3.14159 -42 1e-6 0x1F",
    "naïve café — 日本語のテキスト 🙂👍🏽",
    "e\u0301 (decomposed) vs \u00e9 (composed); Zalgo: Z\u0351\u0360a\u0337l\u0334g\u0335o",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nThe user wants a number.\n</think>\n\n42",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "it's we're they'll I'd you've HE'S",
    "",
]

CHAT_CASES = [
    {
        "name": "system_user_gen",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "kwargs": {"add_generation_prompt": True},
    },
    {
        "name": "user_gen_no_thinking",
        "messages": [{"role": "user", "content": "Say hi."}],
        "kwargs": {"add_generation_prompt": True, "enable_thinking": False},
    },
    {
        "name": "multi_turn_with_reasoning",
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Simple arithmetic."},
            {"role": "user", "content": "And 3+3?"},
        ],
        "kwargs": {"add_generation_prompt": True},
    },
    {
        "name": "tools_and_tool_response",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "content": '{"temp_c": 21}'},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather for a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                },
            }
        ],
        "kwargs": {"add_generation_prompt": True},
    },
    {
        "name": "tool_call_arguments_as_string",
        "messages": [
            {"role": "user", "content": "Add 2 and 3."},
            {
                "role": "assistant",
                "content": "Calling the tool.",
                "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}],
            },
        ],
        "kwargs": {"add_generation_prompt": False},
    },
    {
        "name": "image_part",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this."}]},
        ],
        "kwargs": {"add_generation_prompt": True},
    },
]


def tokenizer_cases(out_dir: Path, arch: str, vocab_size: int) -> dict:
    """Encode/decode and chat-template cases, checked between `tokenizers` and transformers."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoTokenizer.from_pretrained(str(out_dir))
    problems = []
    if len(hf) != vocab_size:
        problems.append(f"transformers tokenizer has {len(hf)} tokens, config says {vocab_size}")
    enc_cases = []
    for text in TOKENIZER_TEXTS:
        ids = raw.encode(text, add_special_tokens=False).ids
        hf_ids = hf.encode(text, add_special_tokens=False)
        if ids != hf_ids:
            problems.append(f"encode mismatch tokenizers vs transformers for {text!r}")
        enc_cases.append(
            {
                "text": text,
                "ids": ids,
                "decoded": raw.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": raw.decode(ids, skip_special_tokens=True),
            }
        )
    chat_cases = []
    for case in CHAT_CASES:
        rendered = hf.apply_chat_template(case["messages"], tools=case.get("tools"), tokenize=False, **case["kwargs"])
        ids = raw.encode(rendered, add_special_tokens=False).ids
        chat_cases.append({**case, "rendered": rendered, "ids": ids})
    doc = {
        "note": "ids are what tokenizer.json produces with add_special_tokens=False (Qwen adds no BOS); "
        "`rendered` is tokenizer_config.json's chat_template applied by transformers",
        "encode": enc_cases,
        "chat": chat_cases,
        "problems": problems,
    }
    (out_dir / "tokenizer_cases.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return doc


# -----------------------------------------------------------------------------------------------
# Loading back and reference computation
# -----------------------------------------------------------------------------------------------
def load_reference_model(out_dir: Path, dtype: torch.dtype, attn: str = "eager", experts: str = "eager"):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = AutoModelForCausalLM.from_pretrained(
            str(out_dir), dtype=dtype, attn_implementation=attn, experts_implementation=experts
        )
    # Parameters loaded straight from an F32 file can be views into the memory-mapped file, at
    # offsets with a different alignment than fresh allocations; the CPU GEMM kernels then take other
    # code paths and the results move by ~1e-6.  Copying every tensor into fresh memory makes the
    # references independent of the file dtype (bf16 and f32 files give bit-identical references).
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            t.data = t.data.clone()
    m.eval()
    return m


def text_layers(model):
    return model.model.layers


def verify_load(mem_model, ref_model, arch: str, out_dir: Path, cfg_json: dict) -> dict:
    """Check that transformers reads the files back to exactly the in-memory weights/config."""
    from transformers import AutoConfig

    mem = {}
    for k, v in mem_model.state_dict().items():
        if arch == "qwen3_5_moe":
            if not k.startswith("model.language_model.") and k != "lm_head.weight":
                continue
            k = k.replace("model.language_model.", "model.")
        mem[k] = v
    ref = ref_model.state_dict()
    missing = sorted(set(mem) - set(ref))
    extra = sorted(set(ref) - set(mem))
    worst = 0.0
    for k in set(mem) & set(ref):
        worst = max(worst, float((mem[k].float() - ref[k].float()).abs().max()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.from_pretrained(str(out_dir))
    tcfg = cfg.get_text_config()
    mcfg = mem_model.config.get_text_config()
    cfg_same = all(
        getattr(tcfg, a) == getattr(mcfg, a)
        for a in ["layer_types", "num_experts", "num_experts_per_tok", "head_dim", "linear_num_value_heads", "vocab_size"]
    ) and tcfg.rope_parameters == mcfg.rope_parameters
    return {
        "reloaded_class": type(ref_model).__name__,
        "missing_after_reload": missing,
        "unexpected_after_reload": extra,
        "max_abs_param_diff_after_reload": worst,
        "config_roundtrip_identical": bool(cfg_same),
    }


@torch.no_grad()
def forward_logits(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False, **kw).logits


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n: int, attention_mask=None, position_ids=None):
    """Greedy decoding with the cache, one token per step, EOS ignored.

    Returns (tokens [B, n], step_logits [B, n, V], prefill_logits [B, L, V], cache).  step_logits[:, s]
    is the distribution token s was taken from (s = 0 comes from the prefill's last position; the
    others from single-token decode steps, which run the recurrent form of the gated delta rule
    and the one-step causal-conv update).
    """
    cache = new_cache(model)
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    if position_ids is not None:
        kw["position_ids"] = position_ids
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, **kw)
    prefill = out.logits
    last = prefill[:, -1]
    toks, steps = [], []
    mask, pos = attention_mask, position_ids
    for s in range(n):
        steps.append(last.float())
        nxt = last.argmax(-1)
        toks.append(nxt)
        if s == n - 1:
            break
        kw = {}
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            kw["attention_mask"] = mask
        if pos is not None:
            pos = pos[:, -1:] + 1
            kw["position_ids"] = pos
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True, **kw)
        last = out.logits[:, -1]
    return torch.stack(toks, 1), torch.stack(steps, 1), prefill, cache


@torch.no_grad()
def router_gap(model, ids: torch.Tensor) -> float:
    """Smallest (k-th minus (k+1)-th) router logit gap over all tokens and MoE layers of a forward."""
    k = model.config.num_experts_per_tok
    gaps = []

    def hook(_m, _i, out):
        top = out[0].float().topk(k + 1, dim=-1).values
        gaps.append(float((top[:, k - 1] - top[:, k]).min()))

    hs = [layer.mlp.gate.register_forward_hook(hook) for layer in text_layers(model)]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return min(gaps)


def top2_margin(logits: torch.Tensor) -> float:
    t = logits.float().topk(2, dim=-1).values
    return float((t[..., 0] - t[..., 1]).min())


@torch.no_grad()
def hf_generate(model, ids, n, attention_mask=None):
    """transformers' own generate(), greedy, EOS disabled; used only as a cross-check."""
    from transformers import GenerationConfig

    # Always pass a mask: without one, generate() derives it from pad_token_id and treats every
    # prompt token equal to the pad id as padding.
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    pad_id = model.generation_config.pad_token_id

    # eos_token_id=[] (not None) is what switches stopping off: None would be filled in from the
    # model's generation_config.json / config.json and generation would stop at <|im_end|>.
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=[],
                          pad_token_id=pad_id, use_cache=True, temperature=None, top_p=None, top_k=None)
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the Instruct-style sampling defaults trigger warnings
    try:
        out = model.generate(input_ids=ids, attention_mask=attention_mask, generation_config=gc)
    finally:
        transformers.logging.set_verbosity(level)
    return out[:, ids.shape[1]:]


@torch.no_grad()
def debug_capture(model, ids: torch.Tensor, arch: str) -> tuple[dict, dict]:
    """Per-layer activations, router decisions and cache contents for one prompt."""
    layers = text_layers(model)
    cfg = model.config
    rec: dict[str, torch.Tensor] = {}
    hooks = []

    def save(name, fn=lambda o: o):
        def hook(_mod, _inp, out):
            rec[name] = fn(out).detach().float()[0].clone()

        return hook

    hooks.append(model.model.embed_tokens.register_forward_hook(save("debug.embeddings")))
    for i, layer in enumerate(layers):
        if cfg.layer_types[i] == "linear_attention":
            hooks.append(layer.linear_attn.register_forward_hook(save(f"debug.layer.{i}.mixer_out")))
        else:
            hooks.append(layer.self_attn.register_forward_hook(save(f"debug.layer.{i}.mixer_out", lambda o: o[0])))
        hooks.append(layer.mlp.register_forward_hook(save(f"debug.layer.{i}.moe_out")))
        hooks.append(layer.register_forward_hook(save(f"debug.layer.{i}.output")))

        def router_hook(_mod, _inp, out, i=i):
            logits, weights, idx = out
            rec[f"debug.layer.{i}.router_logits"] = logits.detach().float().clone()
            rec[f"debug.layer.{i}.topk_ids"] = idx.detach().to(torch.int64).clone()
            rec[f"debug.layer.{i}.topk_weights"] = weights.detach().float().clone()

        hooks.append(layer.mlp.gate.register_forward_hook(router_hook))
        hooks.append(
            layer.mlp.shared_expert_gate.register_forward_hook(
                lambda _m, _i, o, i=i: rec.__setitem__(f"debug.layer.{i}.shared_expert_gate", torch.sigmoid(o.detach().float()).clone())
            )
        )
    hooks.append(model.model.norm.register_forward_hook(save("debug.final_norm")))
    try:
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    # Cross-check the hooks against transformers' own `output_hidden_states=True` tuple.  Quirk: that
    # tuple has num_layers + 1 entries = [embeddings, outputs of layers 0 .. n-2, final_norm(output of
    # layer n-1)]; the raw output of the last layer only exists in debug.layer.{n-1}.output.
    hs = out.hidden_states
    n = len(layers)
    ours = [rec["debug.embeddings"]] + [rec[f"debug.layer.{i}.output"] for i in range(n - 1)] + [rec["debug.final_norm"]]
    diag = {
        "hidden_states_tuple_len": len(hs),
        "hidden_states_tuple_layout": "[embeddings, layer 0..n-2 outputs, final_norm(layer n-1 output)]",
        "hidden_states_vs_hooks_max_abs_diff": max(float((hs[j][0].float() - ours[j]).abs().max()) for j in range(len(hs)))
        if len(hs) == len(ours) else None,
    }
    # Router top-k gaps: how close the k-th and (k+1)-th probability come (ties would make the
    # expert choice fragile for an engine with slightly different rounding).
    k = cfg.num_experts_per_tok
    gaps, lgaps = [], []
    for i in range(len(layers)):
        rl = rec[f"debug.layer.{i}.router_logits"]
        top = torch.softmax(rl, -1).topk(k + 1, -1).values
        gaps.append(float((top[:, k - 1] - top[:, k]).min()))
        ltop = rl.topk(k + 1, -1).values
        lgaps.append(float((ltop[:, k - 1] - ltop[:, k]).min()))
    diag["router_min_prob_gap_kth_vs_next"] = gaps
    diag["router_min_logit_gap_kth_vs_next"] = lgaps

    # Cache contents after a cached prefill of the same prompt.
    cache = new_cache(model)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    for i in range(len(layers)):
        if cfg.layer_types[i] == "linear_attention":
            rec[f"debug.layer.{i}.conv_state"] = cache.layers[i].conv_states[0][0].float().clone()
            rec[f"debug.layer.{i}.recurrent_state"] = cache.layers[i].recurrent_states[0][0].float().clone()
        else:
            rec[f"debug.layer.{i}.key_cache"] = cache.layers[i].keys[0].float().clone()
            rec[f"debug.layer.{i}.value_cache"] = cache.layers[i].values[0].float().clone()
    return rec, diag


def which_kernels() -> dict:
    """Which implementation of each hub-kernel-capable function transformers will call."""
    import importlib.util

    info = {}
    for pkg, desc in [("fla", "flash-linear-attention"), ("causal_conv1d", "causal-conv1d"), ("kernels", "hf kernels")]:
        info[desc + " installed"] = importlib.util.find_spec(pkg) is not None
    info["chunked prefill path"] = "torch_chunk_gated_delta_rule (pure PyTorch, chunk_size=64, fp32 math)"
    info["single-token decode path"] = "torch_recurrent_gated_delta_rule (pure PyTorch, fp32 math)"
    info["causal conv"] = "causal_conv1d_fn / causal_conv1d_update torch fallbacks (F.conv1d)"
    return info


def run_reference(out_dir: Path, arch: str, shape: dict, ps: dict, mem_model, cfg_json: dict,
                  skip_bf16: bool = False) -> tuple[dict, dict]:
    V = shape["vocab_size"]
    ids_map = token_ids(V, arch)
    n_regular = V - len(special_token_list(arch))

    log("loading the checkpoint back with transformers (float32, eager attention, eager experts)")
    model = load_reference_model(out_dir, torch.float32)

    # Random prompts, redrawn while a greedy step or a router top-k decision would be a near-tie
    # (see MIN_GREEDY_MARGIN and MIN_ROUTER_GAP).  The draw is a pure function of the prompt-set seed,
    # the prompt index and the attempt number, so it is reproducible.
    prompts, draws = [], []
    for i, L in enumerate(ps["lengths"]):
        best = None
        for attempt in range(MAX_PROMPT_DRAWS):
            g = torch.Generator().manual_seed(ps["seed"] * 1000 + i * 100 + attempt)
            cand = torch.randint(0, n_regular, (L,), generator=g)
            toks, steps, _, _ = greedy(model, cand[None], NUM_GREEDY)
            margin = top2_margin(steps)
            gap = router_gap(model, torch.cat([cand, toks[0, :-1]])[None])
            score = min(margin / MIN_GREEDY_MARGIN, gap / MIN_ROUTER_GAP)
            if best is None or score > best[1]:
                best = (cand, score, attempt)
            if score >= 1.0:
                break
        if best[1] < 1.0:
            log(f"WARNING: prompt {i}: no draw met the margins (best score {best[1]:.2f}); keeping the best")
        prompts.append(best[0])
        draws.append(best[2] + 1)

    # A chat-formatted prompt as well (exercises special tokens inside a prompt).
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_tok = AutoTokenizer.from_pretrained(str(out_dir))
    raw = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    # The first candidate user message whose greedy steps and router decisions clear the margins.
    best = None
    for attempt, user_text in enumerate(ps["chat_user"]):
        text = hf_tok.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        cand = torch.tensor(raw.encode(text, add_special_tokens=False).ids, dtype=torch.int64)
        toks, steps, _, _ = greedy(model, cand[None], NUM_GREEDY)
        score = min(top2_margin(steps) / MIN_GREEDY_MARGIN,
                    router_gap(model, torch.cat([cand, toks[0, :-1]])[None]) / MIN_ROUTER_GAP)
        if best is None or score > best[1]:
            best = (cand, score, attempt, text)
        if score >= 1.0:
            break
    if best[1] < 1.0:
        log(f"WARNING: chat prompt: no candidate met the margins (best score {best[1]:.2f}); keeping the best")
    prompts.append(best[0])
    draws.append(best[2] + 1)
    chat_text = best[3]
    sources = ["random"] * len(ps["lengths"]) + ["chat_template"]

    tensors: dict[str, torch.Tensor] = {}
    drop: set[str] = set()  # computed (and used by the checks) but not written, see preset "lean"
    lean = bool(shape.get("lean"))
    longest = max(range(len(ps["lengths"])), key=lambda j: ps["lengths"][j])
    meta: dict = {"prompts": [], "checks": {}}
    meta["checks"]["reload"] = verify_load(mem_model, model, arch, out_dir, cfg_json)
    if arch == "qwen3_5_moe":
        # The composite image-text class must give the same text logits as the text-only class.
        with torch.no_grad():
            a = mem_model(input_ids=prompts[2][None]).logits
            b = model(input_ids=prompts[2][None]).logits
        meta["checks"]["conditional_generation_vs_causal_lm_max_abs_diff"] = float((a - b).abs().max())

    for i, p in enumerate(prompts):
        log(f"prompt {i}: {len(p)} tokens ({sources[i]})")
        ids = p[None]
        logits = forward_logits(model, ids)[0]
        toks, steps, prefill_cached, _ = greedy(model, ids, NUM_GREEDY)
        toks, steps = toks[0], steps[0]
        # Consistency checks inside transformers itself:
        full = torch.cat([p, toks[:-1]])[None]
        recompute = forward_logits(model, full)[0, len(p) - 1:]
        gen = hf_generate(model, ids, NUM_GREEDY)[0]
        tensors[f"prompt.{i}.input_ids"] = p.clone()
        tensors[f"prompt.{i}.logits"] = logits.float()
        tensors[f"prompt.{i}.greedy_ids"] = toks.clone()
        tensors[f"prompt.{i}.greedy_logits"] = steps.float()
        if lean and sources[i] == "chat_template":
            drop.update({f"prompt.{i}.logits", f"prompt.{i}.greedy_logits"})
        elif lean and i not in (1, longest):
            drop.add(f"prompt.{i}.greedy_logits")
        meta["prompts"].append(
            {
                "index": i,
                "source": sources[i],
                "draws": draws[i],
                "length": len(p),
                "input_ids": p.tolist(),
                "greedy_ids": toks.tolist(),
                "greedy_text": raw.decode(toks.tolist(), skip_special_tokens=False),
                "min_top1_top2_margin_prefill_logits": top2_margin(logits),
                "min_top1_top2_margin_greedy_steps": top2_margin(steps),
                "min_router_logit_gap_prompt_and_continuation": router_gap(model, full),
                "cached_prefill_vs_uncached_max_abs_diff": float((prefill_cached[0] - logits).abs().max()),
                "decode_steps_vs_full_recompute_max_abs_diff": float((steps - recompute).abs().max()),
                "hf_generate_matches_manual_greedy": bool(torch.equal(gen, toks)),
            }
        )
        if sources[i] == "chat_template":
            meta["prompts"][-1]["text"] = chat_text

    # Per-layer debug data for one prompt.
    dbg_i = ps["debug_index"]
    log(f"per-layer capture on prompt {dbg_i}")
    rec, diag = debug_capture(model, prompts[dbg_i][None], arch)
    tensors.update(rec)
    meta["debug"] = {"prompt_index": dbg_i, **diag}

    # Batched, left-padded pair.
    a_i, b_i = ps["batch_pair"]
    pa, pb = prompts[a_i], prompts[b_i]
    Lm = max(len(pa), len(pb))
    pad = ids_map["<|endoftext|>"]
    batch = torch.full((2, Lm), pad, dtype=torch.int64)
    mask = torch.zeros((2, Lm), dtype=torch.int64)
    for r, p in enumerate([pa, pb]):
        batch[r, Lm - len(p):] = p
        mask[r, Lm - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    log(f"batched left-padded case: prompts {a_i} and {b_i}")
    with torch.no_grad():
        blogits = model(input_ids=batch, attention_mask=mask, position_ids=pos, use_cache=False).logits
    btoks, bsteps, _, _ = greedy(model, batch, NUM_GREEDY, attention_mask=mask, position_ids=pos)
    bgen = hf_generate(model, batch, NUM_GREEDY, attention_mask=mask)
    diffs = []
    for r, (p, pi) in enumerate([(pa, a_i), (pb, b_i)]):
        diffs.append(float((blogits[r, Lm - len(p):] - tensors[f"prompt.{pi}.logits"]).abs().max()))
    step_diff = max(float((bsteps[r] - tensors[f"prompt.{pi}.greedy_logits"]).abs().max()) for r, pi in enumerate([a_i, b_i]))
    same = [bool(torch.equal(btoks[r], tensors[f"prompt.{pi}.greedy_ids"])) for r, pi in enumerate([a_i, b_i])]
    tensors["batch.input_ids"] = batch
    tensors["batch.attention_mask"] = mask
    tensors["batch.position_ids"] = pos
    tensors["batch.greedy_ids"] = btoks
    tensors["batch.last_logits"] = blogits[:, -1].float()
    meta["batch"] = {
        "prompt_indices": [a_i, b_i],
        "padding": "left, pad id = <|endoftext|>, attention_mask 0 on pads, position_ids count real tokens only",
        "prefill_logits_vs_unbatched_max_abs_diff": diffs,
        "greedy_step_logits_vs_unbatched_max_abs_diff": step_diff,
        "greedy_ids_equal_unbatched": same,
        "hf_generate_matches_manual_greedy": bool(torch.equal(bgen, btoks)),
    }

    # transformers' faster default paths (SDPA attention, grouped_mm experts) vs. the eager reference.
    log("cross-check: default attention / experts implementations")
    fast = load_reference_model(out_dir, torch.float32, attn="sdpa", experts=None)
    with torch.no_grad():
        fl = fast(input_ids=prompts[longest][None], use_cache=False).logits[0]
    meta["checks"]["default_impls"] = {
        "attn_implementation": fast.config._attn_implementation,
        "experts_implementation": fast.config._experts_implementation,
        "max_abs_diff_vs_eager_on_longest_prompt": float((fl - tensors[f"prompt.{longest}.logits"]).abs().max()),
    }
    del fast

    # bfloat16 run (transformers' own bf16 inference: weights and activations in bf16; the
    # gated-delta-rule math and its recurrent state stay fp32 inside the torch kernels).
    if not skip_bf16:
        log("bfloat16 run")
        m16 = load_reference_model(out_dir, torch.bfloat16)
        bf = []
        for i, p in enumerate(prompts):
            ids = p[None]
            with torch.no_grad():
                l16 = m16(input_ids=ids, use_cache=False).logits[0]
            t16, s16, _, _ = greedy(m16, ids, NUM_GREEDY)
            keep = shape.get("store_bf16_logits")
            if keep is True or (isinstance(keep, (list, tuple)) and i in keep):
                tensors[f"bf16.prompt.{i}.logits"] = l16.to(torch.bfloat16)
            tensors[f"bf16.prompt.{i}.greedy_ids"] = t16[0].clone()
            ref = tensors[f"prompt.{i}.logits"]
            bf.append(
                {
                    "index": i,
                    "max_abs_diff_vs_f32_logits": float((l16.float() - ref).abs().max()),
                    "argmax_agreement_vs_f32": float((l16.float().argmax(-1) == ref.argmax(-1)).float().mean()),
                    "greedy_ids": t16[0].tolist(),
                    "greedy_prefix_agreeing_with_f32": int(
                        (torch.cumprod((t16[0] == tensors[f"prompt.{i}.greedy_ids"]).int(), 0)).sum()
                    ),
                }
            )
        meta["bf16"] = {"logits_stored_for_prompts": sorted(int(k.split(".")[2]) for k in tensors if k.startswith("bf16.") and k.endswith(".logits")),
                        "prompts": bf}
        del m16
    for k in drop:
        del tensors[k]
    meta["not_stored"] = sorted(drop)
    return tensors, meta


# -----------------------------------------------------------------------------------------------
# generate sub-command
# -----------------------------------------------------------------------------------------------
def load_shape(args) -> tuple[str, dict]:
    """A preset, or a JSON file {"name": ..., "base": <preset>, <keys to override>...}."""
    if args.shape_json:
        spec = json.loads(Path(args.shape_json).read_text())
        shape = dict(PRESETS[spec.get("base", "tiny")])
        shape.update({k: v for k, v in spec.items() if k not in ("name", "base", "comment")})
        return spec.get("name", Path(args.shape_json).stem), shape
    if not args.config:
        sys.exit("give --config or --shape-json")
    return args.config, dict(PRESETS[args.config])


def load_prompt_set(args) -> tuple[str, dict]:
    """A built-in prompt set, or a JSON file with the same keys as PROMPT_SETS entries (+ "name")."""
    if args.prompt_set_json:
        spec = json.loads(Path(args.prompt_set_json).read_text())
        spec["batch_pair"] = tuple(spec["batch_pair"])
        return spec.get("name", Path(args.prompt_set_json).stem), spec
    return args.prompt_set, PROMPT_SETS[args.prompt_set]


def cmd_generate(args) -> None:
    torch.set_num_threads(args.threads)
    config_name, shape = load_shape(args)
    ps_name, ps = load_prompt_set(args)
    arch = args.arch
    out_dir = Path(args.out)
    if out_dir.exists():
        if not args.force:
            sys.exit(f"{out_dir} exists; pass --force to overwrite")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    t0 = time.time()

    log(f"building {arch} / {config_name} (seed {args.seed}, prompts {ps_name})")
    model = build_model(shape, arch)
    model.eval()
    init_weights(model, args.seed)
    n_params = sum(p.numel() for p in model.parameters())

    tensors = checkpoint_tensors(model, arch)
    shard_mb = args.shard_mb if args.shard_mb is not None else shape.get("shard_mb")
    weight_files = write_safetensors(tensors, out_dir, args.weights_dtype, shard_mb)
    cfg_json = write_config(model, shape, arch, out_dir, args.weights_dtype)
    write_generation_config(shape, arch, out_dir)

    if args.tokenizer_from:
        log(f"copying tokenizer files from {args.tokenizer_from}")
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(Path(args.tokenizer_from) / f, out_dir / f)
        corpus = [{"file": f"copied from {Path(args.tokenizer_from).name}"}]
    else:
        log("training the byte-level BPE tokenizer")
        tok, corpus = train_tokenizer(shape["vocab_size"], arch)
        write_tokenizer(tok, arch, shape["vocab_size"], out_dir)
    tok_doc = tokenizer_cases(out_dir, arch, shape["vocab_size"])

    ref_tensors, meta = run_reference(out_dir, arch, shape, ps, model, cfg_json, skip_bf16=args.skip_bf16)

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref_tensors.items()}, str(out_dir / "reference.safetensors"),
              metadata={"format": "pt"})  # one key: safetensors writes several in random order

    shape_public = {k: v for k, v in shape.items() if k not in ("store_bf16_logits", "shard_mb", "lean")}
    doc = {
        "fixture": out_dir.name,
        "arch": arch,
        "config_preset": config_name,
        "shape": shape_public,
        "layer_types": layer_types_for(shape),
        "seed": args.seed,
        "prompt_set": ps_name,
        "num_greedy_tokens": NUM_GREEDY,
        "num_parameters": n_params,
        "weights": {
            "files": weight_files,
            "dtype": args.weights_dtype,
            "note": "every tensor except linear_attn.A_log holds bf16-representable values; A_log is F32 "
            "with full f32 precision. The float32 reference below was computed from exactly these values.",
        },
        "special_token_ids": token_ids(shape["vocab_size"], arch),
        "versions": versions(),
        "torch_threads": args.threads,
        "transformers_kernels": which_kernels(),
        "tokenizer_corpus": corpus,
        "tokenizer_problems": tok_doc["problems"],
        "reference_tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                              for k, v in sorted(ref_tensors.items())},
        **meta,
        "command": (
            f"python make_fixtures.py generate --arch {arch} "
            + (f"--shape-json {Path(args.shape_json).name} " if args.shape_json else f"--config {args.config} ")
            + f"--seed {args.seed} "
            + (f"--prompt-set-json {Path(args.prompt_set_json).name} " if args.prompt_set_json else f"--prompt-set {args.prompt_set} ")
            + f"--weights-dtype {args.weights_dtype} --out <dir>/{out_dir.name}"
        ),
        "seconds": round(time.time() - t0, 1),
    }
    (out_dir / "reference.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    for f in out_dir.iterdir():
        f.chmod(0o644)  # safetensors creates its files 0600
    total = sum(f.stat().st_size for f in out_dir.iterdir())
    log(f"wrote {out_dir} ({total / 1e6:.2f} MB, {n_params} parameters) in {time.time() - t0:.0f} s")
    problems = list(tok_doc["problems"])
    rl = meta["checks"]["reload"]
    if rl["missing_after_reload"] or rl["unexpected_after_reload"] or rl["max_abs_param_diff_after_reload"] != 0.0:
        problems.append(f"reload mismatch: {rl}")
    if problems:
        log("PROBLEMS: " + "; ".join(problems))
        sys.exit(1)


# -----------------------------------------------------------------------------------------------
# bench sub-command
# -----------------------------------------------------------------------------------------------
@torch.no_grad()
def cmd_bench(args) -> None:
    """Time transformers' CPU prefill and greedy decode on a larger random-weight model."""
    torch.set_num_threads(args.threads)
    shape = dict(PRESETS[args.config])
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    arch = args.arch
    log(f"bench: {arch} / {args.config}, dtype {args.dtype}, threads {torch.get_num_threads()}")
    t0 = time.time()
    cfg = build_config(shape, arch)
    if arch == "qwen3_next":
        from transformers import Qwen3NextForCausalLM as cls
    else:
        from transformers import Qwen3_5MoeForCausalLM as cls

        cfg = cfg.text_config
    cfg._attn_implementation = args.attn
    if args.experts:
        cfg._experts_implementation = args.experts
    # Build directly in the target dtype; transformers' default init is good enough for timing
    # (random router -> roughly uniform expert load, like a real model on diverse text).
    torch.set_default_dtype(dtype)
    try:
        model = cls(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    if args.experts:
        model.set_experts_implementation(args.experts)
    model.set_attn_implementation(args.attn)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    bytes_w = sum(p.numel() * p.element_size() for p in model.parameters())
    log(f"built {n_params / 1e9:.2f} G params ({bytes_w / 2**30:.1f} GiB) in {time.time() - t0:.0f} s; "
        f"attention={model.config._attn_implementation}, experts={model.config._experts_implementation}")
    V = shape["vocab_size"]
    g = torch.Generator().manual_seed(0)

    def run_prefill(L):
        ids = torch.randint(0, V - 32, (1, L), generator=g)
        cache = new_cache(model)
        t = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t, out, cache

    # warm-up (allocator, oneDNN primitive creation)
    run_prefill(16)
    results = {}
    pre_times = []
    for _ in range(args.repeats):
        dt, out, cache = run_prefill(args.prefill_len)
        pre_times.append(dt)
    best = min(pre_times)
    results["prefill_tokens"] = args.prefill_len
    results["prefill_seconds_best"] = best
    results["prefill_tokens_per_s"] = args.prefill_len / best
    log(f"prefill {args.prefill_len} tokens: {best:.2f} s best of {args.repeats} -> {args.prefill_len / best:.1f} tok/s")

    # Greedy decode continuing from a short prompt (batch 1), timing each single-token step.
    dt, out, cache = run_prefill(args.decode_prompt_len)
    tok = out.logits[:, -1].argmax(-1)
    step_times = []
    for _ in range(args.new_tokens):
        t = time.perf_counter()
        out = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True)
        step_times.append(time.perf_counter() - t)
        tok = out.logits[:, -1].argmax(-1)
    steady = step_times[2:] if len(step_times) > 4 else step_times
    mean = sum(steady) / len(steady)
    median = float(np.median(steady))
    results["decode_prompt_tokens"] = args.decode_prompt_len
    results["decode_new_tokens"] = args.new_tokens
    results["decode_seconds_per_token_mean"] = mean
    results["decode_seconds_per_token_median"] = median
    results["decode_seconds_per_token_p10_p90"] = [float(np.percentile(steady, 10)), float(np.percentile(steady, 90))]
    results["decode_tokens_per_s"] = 1.0 / mean
    results["decode_tokens_per_s_median_step"] = 1.0 / median
    log(f"greedy decode: {1.0 / mean:.2f} tok/s (mean of {len(steady)} steps, {mean * 1000:.0f} ms/token; "
        f"median {median * 1000:.0f} ms, p10-p90 {results['decode_seconds_per_token_p10_p90'][0] * 1000:.0f}-"
        f"{results['decode_seconds_per_token_p10_p90'][1] * 1000:.0f} ms)")

    # transformers' generate() end to end (includes its own prefill and bookkeeping).
    from transformers import GenerationConfig

    ids = torch.randint(0, V - 32, (1, args.decode_prompt_len), generator=g)
    gc = GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=0,
                          eos_token_id=[], pad_token_id=0, temperature=None, top_p=None, top_k=None)
    t = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    e2e = time.perf_counter() - t
    results["generate_end_to_end_seconds"] = e2e
    results["generate_tokens_per_s_including_prefill"] = args.new_tokens / e2e
    log(f"generate(): {args.new_tokens} new tokens after a {args.decode_prompt_len}-token prompt in {e2e:.2f} s "
        f"-> {args.new_tokens / e2e:.2f} tok/s")
    doc = {
        "arch": arch,
        "config": args.config,
        "shape": {k: v for k, v in shape.items() if k not in ("store_bf16_logits", "shard_mb", "lean")},
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": model.config._experts_implementation,
        "num_parameters": n_params,
        "weight_bytes": bytes_w,
        "versions": versions(),
        "cpu": platform.processor() or platform.machine(),
        **results,
    }
    print(json.dumps(doc, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")


# -----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="build one fixture directory")
    g.add_argument("--arch", choices=["qwen3_next", "qwen3_5_moe"], required=True)
    g.add_argument("--config", choices=sorted(PRESETS), help="shape preset")
    g.add_argument("--shape-json", default=None,
                   help='JSON file {"name": ..., "base": <preset>, ...overrides} instead of --config')
    g.add_argument("--seed", type=int, default=0, help="weight seed")
    g.add_argument("--prompt-set", choices=sorted(PROMPT_SETS), default="public")
    g.add_argument("--prompt-set-json", default=None,
                   help="JSON file with a prompt set (keys as in PROMPT_SETS, plus name) instead of --prompt-set")
    g.add_argument("--out", required=True, help="output directory (created)")
    g.add_argument("--weights-dtype", choices=["bf16", "f32"], default="bf16",
                   help="dtype of the weight files (A_log is always F32). Both give the same values, so "
                   "the references are identical.")
    g.add_argument("--shard-mb", type=float, default=None, help="shard the weights (default: per preset)")
    g.add_argument("--tokenizer-from", default=None,
                   help="copy tokenizer.json / tokenizer_config.json from this directory instead of training")
    g.add_argument("--skip-bf16", action="store_true", help="skip the bfloat16 run")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--force", action="store_true")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="time transformers CPU prefill / greedy decode (writes nothing)")
    b.add_argument("--arch", choices=["qwen3_next", "qwen3_5_moe"], default="qwen3_next")
    b.add_argument("--config", choices=sorted(PRESETS), default="bench")
    b.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    b.add_argument("--attn", default="sdpa", help="attention implementation (eager, sdpa)")
    b.add_argument("--experts", default=None, help="experts implementation (eager, grouped_mm, batched_mm); default: transformers' choice")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--prefill-len", type=int, default=512)
    b.add_argument("--decode-prompt-len", type=int, default=16)
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=2)
    b.add_argument("--json-out", default=None)
    b.set_defaults(func=cmd_bench)

    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
