"""Throughput of the harness vs a plain full-cache decode loop, on the same model and tokens.

``python benchmarks/bench_eval_speed.py``: the plain loop is what one would write with transformers
alone (sdpa attention, ``DynamicCache``, one token per call, batch 1, logits of every token); the
harness rows run the protocol on windows of ``--tokens`` tokens, ``--batch`` windows at a time.
Units: token forwards per second (one token of one window through the model).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from weightedkv_ext import WeightedKVCache  # noqa: E402

# The keyword transformers' forward takes the cache under (``cache`` from 5.24, else
# ``past_key_values``), as the library's own cache reports it.
CACHE_KWARG = next(iter(WeightedKVCache(None, policy="full").as_kwargs()))


@torch.inference_mode()
def plain_decode(model, ids: torch.Tensor) -> float:
    """Token forwards/s of a token-by-token DynamicCache loop over ``ids`` (1-D)."""
    from transformers import DynamicCache

    cache, nll = DynamicCache(config=model.config), 0.0
    t0 = time.perf_counter()
    for t in range(len(ids) - 1):
        logits = model(input_ids=ids[None, t : t + 1], **{CACHE_KWARG: cache}, use_cache=True).logits
        nll += float(F.cross_entropy(logits[0].float(), ids[t + 1 : t + 2]))
    return (len(ids) - 1) / (time.perf_counter() - t0)


def harness(model, ids: torch.Tensor, batch: int, policy: str, budget: int | None, feed: int) -> float:
    from weightedkv_ext.eval.caches import cache_factory
    from weightedkv_ext.eval.protocol import evaluate

    make = cache_factory(policy, budget, 4, None, 1)
    t0 = time.perf_counter()
    totals = evaluate(model, [ids] * batch, len(ids), make, batch=batch, feed=feed)
    return totals.forwards / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/bench_eval_speed.py", description=__doc__)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=512, help="window length (even)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--feed", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from weightedkv_ext import data
    from weightedkv_ext.eval.caches import prepare
    from weightedkv_ext.eval.cli import load_model

    model, tokenizer, desc = load_model(args.model, args.dtype)
    ids = torch.tensor(tokenizer(data.default_text(), verbose=False)["input_ids"][: args.tokens])
    model.set_attn_implementation("sdpa")
    rows = {"plain DynamicCache loop (sdpa, batch 1)": plain_decode(model.eval(), ids)}
    model = prepare(model)
    rows[f"harness full (batch {args.batch})"] = harness(model, ids, args.batch, "full", None, args.feed)
    rows[f"harness weightedkv b={args.budget} (batch {args.batch})"] = harness(
        model, ids, args.batch, "weightedkv", args.budget, args.feed)
    print(f"{desc}, {args.dtype}, {len(ids)} tokens, {torch.get_num_threads()} threads")
    for name, v in rows.items():
        print(f"{name:48s} {v:8.1f} token forwards/s")
    print(json.dumps({k: round(v, 2) for k, v in rows.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
