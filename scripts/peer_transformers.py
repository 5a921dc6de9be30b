#!/usr/bin/env python3
"""Times Hugging Face transformers on a Myriad model directory, for side-by-side figures.

Runs the same measurements as `myriad bench prefill` and `myriad bench decode` on the same
checkpoint (e.g. one written by `myriad make-model --preset bench`): prefill of one long prompt,
and greedy decode with the cache at several batch sizes. Not run in CI. Needs torch and
transformers (shared/fixtures/README.md pins the versions used for the fixtures); nothing is
downloaded.

    python scripts/peer_transformers.py --model DIR --dtype bf16 --threads 2 \
        --prefill-len 4096 --batch 1,8,64 --prompt-len 16 --steps 32 --json-out peer.json
"""

import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-len", type=int, default=4096, help="0 skips the prefill run")
    ap.add_argument("--prefill-repeats", type=int, default=2)
    ap.add_argument("--batch", default="1,8,64", help="decode batch sizes; empty skips decode")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json-out")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True)
    model.eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    regular = int(vocab * 0.9)
    result = {
        "engine": f"transformers {transformers.__version__} / torch {torch.__version__}",
        "dtype": args.dtype,
        "threads": args.threads,
        "load_seconds": load_s,
        "prefill": None,
        "decode": [],
    }
    print(f"loaded {args.model} in {load_s:.1f} s ({result['engine']}, {args.dtype}, {args.threads} threads)")

    with torch.inference_mode():
        if args.prefill_len > 0:
            ids = torch.randint(0, regular, (1, args.prefill_len), generator=gen)
            best = float("inf")
            for _ in range(max(1, args.prefill_repeats)):
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
                best = min(best, time.perf_counter() - t0)
            result["prefill"] = {"prompt_tokens": args.prefill_len, "seconds": best, "tokens_per_s": args.prefill_len / best}
            print(f"prefill {args.prefill_len} tokens: {args.prefill_len / best:.1f} tokens/s ({best:.2f} s)")

        for bsz in [int(b) for b in args.batch.split(",") if b]:
            ids = torch.randint(0, regular, (bsz, args.prompt_len), generator=gen)
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            elapsed = 0.0
            for step in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
                if step >= args.warmup:
                    elapsed += time.perf_counter() - t0
            tps = bsz * args.steps / elapsed
            result["decode"].append({"batch_size": bsz, "tokens_per_s": tps, "step_ms": elapsed * 1e3 / args.steps})
            print(f"decode batch {bsz:>3}: {tps:.1f} tokens/s ({elapsed * 1e3 / args.steps:.1f} ms/step)")

    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
