"""End-to-end decode (CPU): tokens/s and KV memory of SmolLM2-135M with the full cache
(DynamicCache + sdpa) vs WeightedKVCache at budget 256, after 2k, 4k and 8k tokens of context,
batch 1 and 4.

    .venv/bin/python benchmarks/bench_end_to_end.py [--quick] [--contexts ...] [--tokens N] [--threads T]

Protocol (to keep the run short on 2 cores): per variant one batch-1 cache is prefilled in chunks of
512 tokens of the embedded text up to each context in turn (the prefill is shared by the
contexts); at each context, ``--tokens`` greedy decode steps are timed for batch 1, then a copy of
the cache is replicated to batch 4 (``batch_repeat_interleave``: 4 identical rows, the same work
as 4 different ones) and timed the same way. The full and weightedkv steps alternate (full, wkv,
full, wkv, ...) so background load affects both alike; tokens/s = batch x steps / median-based
time. KV bytes: the key/value tensors each cache holds allocated (DynamicCache: the grown K/V;
WeightedKVCache: its fixed slots, budget + chunk_size per head), plus, for weightedkv, the bytes of
the tokens actually held and all its state (statistics, positions).

``--prefill``: instead, the time to prefill SmolLM2 (batch 1) to 1k/2k/4k/8k tokens with
WeightedKVCache(256) (chunked attention through ``block_attention``) vs sdpa with a full
DynamicCache; both are fed the same 512-token chunks, alternating chunk by chunk (full, wkv, full,
...), and the ratio at each context is weightedkv time / full time (issue #15: <= 1.0x).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from transformers import DynamicCache  # noqa: E402

from weightedkv_ext import WeightedKVCache  # noqa: E402

import _model  # noqa: E402
from _common import loadavg, machine, md_table, write  # noqa: E402

BUDGET = 256
PREFILL_CHUNK = 512


def decode_pair(model, caches: dict, toks: dict, steps: int) -> dict:
    """Alternating greedy steps of every cache; returns {name: median step seconds}."""
    times = {k: [] for k in caches}
    for i in range(steps + 1):  # the first round is a warm-up
        for name, cache in caches.items():
            t0 = time.perf_counter()
            toks[name] = _model.step(model, toks[name], cache)
            if i:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.inference_mode()
def prefill_main(args, info):
    """Prefill time to each context, both caches fed the same chunks alternately."""
    contexts = args.contexts or ([1024, 2048] if args.quick else [1024, 2048, 4096, 8192])
    model, tok = _model.load()
    ids = _model.token_ids(tok, max(contexts), 1)
    for warm in (DynamicCache(), WeightedKVCache(BUDGET)):  # first-call costs off the clock
        model(input_ids=ids[:, :PREFILL_CHUNK], **_model.cache_kwargs(warm), use_cache=True)
    caches = {"full": DynamicCache(), f"weightedkv-{BUDGET}": WeightedKVCache(BUDGET)}
    spent = {k: 0.0 for k in caches}
    rows, res, done = [], [], 0
    for ctx in contexts:
        for s in range(done, ctx, PREFILL_CHUNK):
            for name, cache in caches.items():
                t0 = time.perf_counter()
                model(input_ids=ids[:, s:min(s + PREFILL_CHUNK, ctx)], **_model.cache_kwargs(cache),
                      use_cache=True)
                spent[name] += time.perf_counter() - t0
        done = ctx
        full, wkv = spent["full"], spent[f"weightedkv-{BUDGET}"]
        res.append(dict(context=ctx, full_s=full, wkv_s=wkv, ratio=wkv / full, load=loadavg()))
        rows.append([ctx, f"{full:.1f} s", f"{wkv:.1f} s", f"**{wkv / full:.2f}x**", loadavg()[0]])
        print(f"prefill to {ctx}: full (sdpa, DynamicCache) {full:.1f} s, weightedkv-{BUDGET} "
              f"{wkv:.1f} s (ratio {wkv / full:.2f}); load {loadavg()}", flush=True)
    md = [f"## SmolLM2-135M prefill time (float32, batch 1, chunks of {PREFILL_CHUNK} tokens)", "",
          f"full = DynamicCache + sdpa; weightedkv = WeightedKVCache(budget={BUDGET}) (chunk attention "
          "by block_attention). Cumulative time from 0 to each context; the two caches are fed the "
          "same chunks alternately. Ratio = weightedkv / full (<= 1.0: no slower).", "",
          md_table(["context", "full", "weightedkv", "ratio", "load (1 min) after"], rows)]
    j, m = write(args.out if args.out != "bench_end_to_end" else "bench_prefill",
                 {"machine": info, "config": dict(contexts=contexts, chunk=PREFILL_CHUNK,
                                                   budget=BUDGET), "prefill": res}, "\n".join(md))
    print(f"# wrote {j} and {m}; load {loadavg()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="contexts 1024 2048, 8 tokens, batch 1 and 4")
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="default 2048 4096 8192")
    ap.add_argument("--tokens", type=int, default=None, help="timed decode steps per point (default 32)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench_end_to_end")
    ap.add_argument("--prefill", action="store_true",
                    help="prefill time to 1k/2k/4k/8k tokens vs sdpa + DynamicCache (bench_prefill)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prefill:
        info = machine()
        print(f"# machine: {info['nproc']} CPUs, {info['cpu_model']}, threads={info['torch_threads']}, "
              f"load {info['loadavg_start']}", flush=True)
        prefill_main(args, info)
        return
    contexts = args.contexts or ([1024, 2048] if args.quick else [2048, 4096, 8192])
    steps = args.tokens or (8 if args.quick else 32)
    info = machine()
    print(f"# machine: {info['nproc']} CPUs, {info['cpu_model']}, threads={info['torch_threads']}, "
          f"load {info['loadavg_start']}", flush=True)
    model, tok = _model.load()
    ids = _model.token_ids(tok, max(contexts), 1)
    caches = {"full": DynamicCache(), f"weightedkv-{BUDGET}": WeightedKVCache(BUDGET)}
    toks, done, res, rows = {}, 0, [], []
    for ctx in contexts:
        t0 = time.perf_counter()
        for name, cache in caches.items():
            toks[name] = _model.prefill(model, ids[:, done:ctx], cache)
        done = ctx
        print(f"prefill to {ctx}: {time.perf_counter() - t0:.0f} s (both caches)", flush=True)
        for B in args.batches:
            if B == 1:
                cs, ts = caches, toks
            else:
                cs = {k: copy.deepcopy(c) for k, c in caches.items()}
                for c in cs.values():
                    c.batch_repeat_interleave(B)
                ts = {k: t.repeat_interleave(B, 0) for k, t in toks.items()}
            med = decode_pair(model, cs, ts, steps)
            full_name, wkv_name = list(caches)
            wkv = cs[wkv_name]
            point = dict(context=ctx, batch=B, steps=steps,
                         full_tok_s=B / med[full_name], wkv_tok_s=B / med[wkv_name],
                         speedup=med[full_name] / med[wkv_name],
                         full_kv_bytes=_model.kv_bytes(cs[full_name]),
                         wkv_kv_bytes=_model.kv_bytes(wkv), wkv_kv_bytes_held=wkv.kv_bytes_held(),
                         wkv_state_bytes=wkv.memory_bytes(),
                         full_seq_len=cs[full_name].get_seq_length())
            res.append(point)
            mib = lambda x: f"{x / 2**20:.1f}"  # noqa: E731
            rows.append([ctx, B, f"{point['full_tok_s']:.1f}", f"{point['wkv_tok_s']:.1f}",
                         f"**{point['speedup']:.2f}x**", mib(point["full_kv_bytes"]),
                         mib(point["wkv_kv_bytes"]), mib(point["wkv_kv_bytes_held"]),
                         mib(point["wkv_state_bytes"])])
            print(f"context {ctx} batch {B}: full {point['full_tok_s']:.1f} tok/s, weightedkv-{BUDGET} "
                  f"{point['wkv_tok_s']:.1f} tok/s ({point['speedup']:.2f}x); KV MiB full "
                  f"{mib(point['full_kv_bytes'])}, weightedkv {mib(point['wkv_kv_bytes'])}", flush=True)
            if B != 1:
                del cs
    md = [f"## SmolLM2-135M decode throughput and KV memory (float32, {steps} timed tokens per point)", "",
          f"full = DynamicCache + sdpa; weightedkv = WeightedKVCache(budget={BUDGET}) (slots = budget + "
          "chunk_size 128 per head). tokens/s from the median step time; speed-up = weightedkv / full. "
          "KV MiB = allocated K/V tensors; 'held' = K/V of the tokens held; 'state' = all weightedkv "
          "tensors (slots, statistics, positions).", "",
          md_table(["context", "batch", "full tok/s", "weightedkv tok/s", "speed-up", "full KV MiB",
                    "weightedkv KV MiB", "held MiB", "state MiB"], rows)]
    payload = {"machine": info, "config": dict(contexts=contexts, steps=steps, budget=BUDGET,
                                               batches=args.batches), "points": res}
    j, m = write(args.out, payload, "\n".join(md))
    print(f"# wrote {j} and {m}; load {payload['machine']['loadavg_end']}")


if __name__ == "__main__":
    main()
