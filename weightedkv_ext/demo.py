"""``python -m weightedkv_ext.demo``: generate text with WeightedKV on the embedded default.

Feeds a long prompt (the embedded default text, or ``--text FILE``) to SmolLM2-135M-Instruct with a
``WeightedKVCache``, greedily generates a continuation, and prints it with the KV memory held
against what a full cache would hold at the same length.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import data, models
from .cache import WeightedKVCache


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m weightedkv_ext.demo", description=__doc__)
    p.add_argument("--text", default=None, help="prompt file [embedded default text]")
    p.add_argument("--prompt-tokens", type=int, default=1000, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=40, help="tokens to generate")
    p.add_argument("--budget", type=int, default=128, help="KV slots kept per layer and head")
    p.add_argument("--policy", default="weightedkv", help="compression policy")
    args = p.parse_args(argv)
    if args.prompt_tokens < 1 or args.new_tokens < 1:
        p.error(f"--prompt-tokens and --new-tokens must be >= 1, got {args.prompt_tokens}, "
                f"{args.new_tokens}")

    text = open(args.text, encoding="utf-8").read() if args.text else data.default_text()
    model, tok = models.load_smollm2()
    ids = tok(text, return_tensors="pt").input_ids[:, : args.prompt_tokens]
    cache = WeightedKVCache(budget=args.budget, policy=args.policy)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache.as_kwargs(),
                             max_new_tokens=args.new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    cfg = model.config
    seen = out.shape[1] - 1
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    full_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * seen * head_dim * 4
    print(f"prompt: {ids.shape[1]} tokens of {'the embedded default text' if not args.text else args.text}")
    print(f"continuation ({args.policy}, budget {args.budget}):")
    print("  " + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", "\n  "))
    print(f"tokens held per layer and KV head: {int(cache.held_tokens().max())} "
          f"(context {seen} tokens)")
    print(f"KV bytes held: {cache.kv_bytes_held() / 2**20:.2f} MiB (allocated "
          f"{cache.memory_bytes() / 2**20:.2f} MiB) vs a full cache: {full_bytes / 2**20:.2f} MiB")
    print(f"prefill + {args.new_tokens} tokens in {seconds:.1f} s")


if __name__ == "__main__":
    main()
