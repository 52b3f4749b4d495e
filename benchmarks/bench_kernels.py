"""Kernel benchmark (CPU): the engine's accumulate + compress vs the pure-PyTorch reference and a
straightforward vectorised PyTorch implementation; decode_attention vs torch sdpa.

    .venv/bin/python benchmarks/bench_kernels.py [--quick] [--repeats N] [--threads T]

Shapes: batch 1 and 8, 8 KV heads (32 query heads, GQA group 4), head_dim 128, float32, budgets
256/1024/4096; one call removes 1 token (decode: 1 query) or 64 tokens (a chunk: 64 queries).
Policy weightedkv, sinks 4, recent = budget // 2 - 4 (the cache's default rule).

* engine: ``ops.accumulate`` then ``ops.compress`` on the fixed-slot cache (capacity budget + 64,
  held tokens scattered over the slots at random, as after many steps); the mutated statistics /
  positions are restored between repeats outside the timed region.
* vectorised: what most public implementations do on a contiguous ``[B, H, L, D]`` cache: group
  mean of the probabilities, causal mask, ``scores += p.sum``, ``topk`` of the lowest averages among
  the eligible tokens, gather/scatter weighted merge into the right neighbour, gather of the kept
  tokens into a new cache (index_select-style eviction). Timing only: its merge of adjacent
  removals in one chunk is the usual one-shot approximation, not the contract's sequence.
* reference: ``weightedkv_ext.reference`` (Python loops, one removal at a time): very slow, so it
  runs every ``--ref-every``-th repeat only, and with 64 removals only at batch 1.
* append: ``ops.append`` of the new tokens into free slots vs ``torch.cat`` onto the contiguous cache.

decode_attention: one query per head over N held keys (N = budget), fused (output + statistics)
vs ``F.scaled_dot_product_attention`` on a contiguous ``[B, 8, N, 128]`` cache (GQA: enable_gqa,
and transformers' repeat_kv + sdpa), and sdpa plus what the statistics cost without fusion
(softmax(q K^T) recomputed, group mean, ``scores += p``, ``counts += 1``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from weightedkv_ext import ops, reference  # noqa: E402

from _common import fmt_time, interleaved, machine, md_table, write  # noqa: E402

H, G, D = 8, 4, 128
HQ = H * G
SINKS = 4
CHUNK = 64


def recent_for(budget: int) -> int:
    return budget // 2 - SINKS


# ---- slot-cache state (engine and reference) -------------------------------------------------

def slot_state(B: int, C: int, L: int, gen: torch.Generator):
    """Fixed-slot cache with L held tokens (positions 0..L-1) at random slots of C."""
    keys = torch.randn(B, H, C, D, generator=gen)
    values = torch.randn(B, H, C, D, generator=gen)
    slot_pos = torch.full((B, H, C), -1, dtype=torch.int64)
    perm = torch.rand(B, H, C, generator=gen).argsort(-1)[..., :L]
    slot_pos.scatter_(-1, perm, torch.arange(L).expand(B, H, L).contiguous())
    held = slot_pos >= 0
    counts = torch.where(held, (L - slot_pos).clamp_min(1).float(), 0.0)
    scores = torch.where(held, torch.rand(B, H, C, generator=gen) * counts * 0.01, 0.0)
    last = torch.where(held, torch.rand(B, H, C, generator=gen) * 0.01, 0.0)
    return [keys, values, scores, counts, last, slot_pos]


def probs_for(B: int, Q: int, C: int, gen: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(B, HQ, Q, C, generator=gen), dim=-1)


# ---- the vectorised PyTorch implementation (contiguous cache) --------------------------------

def vectorised_step(keys, values, scores, counts, probs, causal, budget, sinks, recent):
    """accumulate + compress on a contiguous cache; returns the new (keys, values, scores, counts)."""
    B, Hk, L, Dh = keys.shape
    Q = probs.shape[2]
    p = probs.view(B, Hk, -1, Q, L).mean(2)  # [B, H, Q, L]
    if Q > 1:
        p = p * causal
    scores = scores + p.sum(2)
    counts = counts + causal.sum(0)
    k = L - budget
    if k <= 0:
        return keys, values, scores, counts
    avg = torch.where(counts > 0, scores / counts, 0.0)
    idx = avg[..., sinks:L - recent].topk(k, dim=-1, largest=False).indices + sinks  # [B, H, k]
    nb = idx + 1  # right neighbour in the contiguous (position) order
    ex = lambda i: i.unsqueeze(-1).expand(-1, -1, -1, Dh)  # noqa: E731
    wj, wr = avg.gather(-1, idx).unsqueeze(-1), avg.gather(-1, nb).unsqueeze(-1)
    merged = (wj * values.gather(2, ex(idx)) + wr * values.gather(2, ex(nb))) / (wj + wr)
    values = values.scatter(2, ex(nb), merged)
    keep = torch.ones(B, Hk, L, dtype=torch.bool).scatter_(-1, idx, False)
    kept = keep.nonzero()[:, 2].view(B, Hk, L - k)  # increasing positions
    return (keys.gather(2, ex(kept)), values.gather(2, ex(kept)), scores.gather(-1, kept),
            counts.gather(-1, kept))


# ---- benchmark 1: accumulate + compress ------------------------------------------------------

def bench_compress(B: int, budget: int, k: int, repeats: int, ref_every: int, gen, run_ref: bool):
    C = budget + CHUNK
    L = budget + k
    recent = recent_for(budget)
    st = slot_state(B, C, L, gen)
    saved = [t.clone() for t in st[2:]]  # scores, counts, last, slot_pos
    probs = probs_for(B, k, C, gen)
    qpos = torch.arange(L - k, L).expand(B, k).contiguous()
    ref_st = [t.clone() for t in st]

    # contiguous cache with the same L tokens, for the vectorised implementation
    ck = torch.randn(B, H, L, D, generator=gen)
    cv = torch.randn(B, H, L, D, generator=gen)
    cs = torch.rand(B, H, L, generator=gen)
    cc = (L - torch.arange(L)).float().expand(B, H, L).contiguous()
    cprobs = probs_for(B, k, L, gen)
    causal = (torch.arange(L)[None, :] <= torch.arange(L - k, L)[:, None]).float()  # [k, L]
    cnew = torch.randn(B, H, k, D, generator=gen)

    # append: state with L - k held tokens, k free slots get the new tokens
    app = slot_state(B, C, L - k, gen)
    app_pos = app[5].clone()
    new_k, new_v = torch.randn(B, H, k, D, generator=gen), torch.randn(B, H, k, D, generator=gen)
    new_pos = torch.arange(L - k, L).expand(B, k).contiguous()
    ck_prev, cv_prev = ck[:, :, :L - k].contiguous(), cv[:, :, :L - k].contiguous()

    def restore(state, src):
        for t, s in zip(state[2:], src):
            t.copy_(s)

    def accumulate_compress(impl, state):
        """One timed accumulate + compress of ``impl`` (ops or reference) from the saved stats."""
        def run():
            restore(state, saved)
            t0 = time.perf_counter()
            impl.accumulate(probs, state[5], qpos, state[2], state[3], state[4])
            impl.compress(*state, budget, SINKS, recent, "weightedkv")
            return time.perf_counter() - t0
        return run

    engine = accumulate_compress(ops, st)

    def vectorised():
        t0 = time.perf_counter()
        vectorised_step(ck, cv, cs, cc, cprobs, causal, budget, SINKS, recent)
        return time.perf_counter() - t0

    ref = accumulate_compress(reference, ref_st)

    def engine_append():
        app[5].copy_(app_pos)
        t0 = time.perf_counter()
        ops.append(*app, new_k, new_v, new_pos)
        return time.perf_counter() - t0

    def cat_append():
        t0 = time.perf_counter()
        torch.cat([ck_prev, cnew], 2)
        torch.cat([cv_prev, cnew], 2)
        return time.perf_counter() - t0

    variants = {"engine": engine, "vectorised": vectorised, "engine_append": engine_append,
                "cat_append": cat_append}
    every = {}
    if run_ref:
        variants["reference"] = ref
        every["reference"] = ref_every
    return interleaved(variants, repeats, warmup=1, only_every=every)


# ---- benchmark 2: decode attention -----------------------------------------------------------

def bench_decode(B: int, N: int, repeats: int, gen):
    C = N + CHUNK
    st = slot_state(B, C, N, gen)
    q = torch.randn(B, HQ, D, generator=gen)
    qpos = torch.full((B,), N - 1, dtype=torch.int64)
    scale = D ** -0.5
    ck = torch.randn(B, H, N, D, generator=gen)
    cv = torch.randn(B, H, N, D, generator=gen)
    cs = torch.zeros(B, H, N)
    cc = torch.zeros(B, H, N)
    q4 = q[:, :, None]  # [B, HQ, 1, D]

    def fused():
        ops.decode_attention(q, st[0], st[1], st[5], qpos, st[2], st[3], st[4], scale)

    def sdpa_gqa():
        F.scaled_dot_product_attention(q4, ck, cv, scale=scale, enable_gqa=True)

    def sdpa_repeat():
        kr = ck[:, :, None].expand(B, H, G, N, D).reshape(B, HQ, N, D)
        vr = cv[:, :, None].expand(B, H, G, N, D).reshape(B, HQ, N, D)
        F.scaled_dot_product_attention(q4, kr, vr, scale=scale)

    def sdpa_stats():
        F.scaled_dot_product_attention(q4, ck, cv, scale=scale, enable_gqa=True)
        p = torch.softmax(torch.matmul(q.view(B, H, G, D), ck.transpose(-1, -2)) * scale, -1)
        cs.add_(p.mean(2))
        cc.add_(1.0)

    return interleaved({"fused": fused, "sdpa_gqa": sdpa_gqa, "sdpa_repeat_kv": sdpa_repeat,
                        "sdpa_plus_stats": sdpa_stats}, repeats, warmup=2)



def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="budgets 256/1024 only, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per point (default 30; quick 10)")
    ap.add_argument("--ref-every", type=int, default=None,
                    help="run the reference every k-th repeat (default: 3 reference runs per point)")
    ap.add_argument("--threads", type=int, default=None, help="torch/at::parallel_for threads")
    ap.add_argument("--out", default="bench_kernels", help="results/<out>.json and .md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (10 if args.quick else 30)
    ref_every = args.ref_every or max(1, repeats // 3)
    budgets = [256, 1024] if args.quick else [256, 1024, 4096]
    gen = torch.Generator().manual_seed(0)
    info = machine()
    print(f"# machine: {info['nproc']} CPUs, {info['cpu_model']}, threads={info['torch_threads']}, "
          f"load {info['loadavg_start']}", flush=True)

    comp_rows, comp_json = [], []
    for k in (1, CHUNK):
        for B in (1, 8):
            for budget in budgets:
                run_ref = k == 1 or B == 1
                r = bench_compress(B, budget, k, repeats, ref_every, gen, run_ref)
                e, v = r["engine"]["median_s"], r["vectorised"]["median_s"]
                ea, ca = r["engine_append"]["median_s"], r["cat_append"]["median_s"]
                ref = r.get("reference", {}).get("median_s")
                em, vm = r["engine"]["min_s"], r["vectorised"]["min_s"]
                row = dict(removed=k, batch=B, budget=budget, **{f"{n}_s": x["median_s"] for n, x in r.items()},
                           **{f"{n}_min_s": x["min_s"] for n, x in r.items()},
                           speedup_vs_vectorised_min=vm / em,
                           n={n: x["n"] for n, x in r.items()},
                           speedup_vs_vectorised=v / e, speedup_vs_reference=(ref / e) if ref else None,
                           cycle_speedup_vs_vectorised=(v + ca) / (e + ea))
                comp_json.append(row)
                comp_rows.append([k, B, budget, fmt_time(e), fmt_time(v), f"**{v / e:.1f}x**", f"{vm / em:.1f}x",
                                  fmt_time(ref) if ref else "n/a", f"{ref / e:.0f}x" if ref else "n/a",
                                  fmt_time(ea), fmt_time(ca), f"{(v + ca) / (e + ea):.1f}x"])
                print(f"compress k={k:2d} B={B} budget={budget:5d}: engine {fmt_time(e)}  vectorised "
                      f"{fmt_time(v)} ({v / e:.1f}x)  reference {fmt_time(ref) if ref else 'n/a'}"
                      f"  append {fmt_time(ea)} vs cat {fmt_time(ca)}", flush=True)

    dec_rows, dec_json = [], []
    for B in (1, 8):
        for N in budgets:
            r = bench_decode(B, N, repeats, gen)
            f_, s_ = r["fused"]["median_s"], r["sdpa_gqa"]["median_s"]
            sr, ss = r["sdpa_repeat_kv"]["median_s"], r["sdpa_plus_stats"]["median_s"]
            best = min(s_, sr)
            fm, bm = r["fused"]["min_s"], min(r["sdpa_gqa"]["min_s"], r["sdpa_repeat_kv"]["min_s"])
            dec_json.append(dict(batch=B, keys=N, **{f"{n}_s": x["median_s"] for n, x in r.items()},
                                 **{f"{n}_min_s": x["min_s"] for n, x in r.items()},
                                 fused_vs_best_sdpa_min=bm / fm,
                                 fused_vs_best_sdpa=best / f_, fused_vs_sdpa_plus_stats=ss / f_))
            dec_rows.append([B, N, fmt_time(f_), fmt_time(s_), fmt_time(sr), f"**{best / f_:.2f}x**",
                             f"{bm / fm:.2f}x",
                             fmt_time(ss), f"{ss / f_:.2f}x"])
            print(f"decode B={B} N={N:5d}: fused {fmt_time(f_)}  sdpa(gqa) {fmt_time(s_)}  "
                  f"sdpa(repeat_kv) {fmt_time(sr)}  sdpa+stats {fmt_time(ss)}", flush=True)

    md = ["## accumulate + compress (weightedkv policy, float32, 8 KV heads, head_dim 128)", "",
          f"Medians of {repeats} interleaved repeats (the '(of mins)' column: the same ratio from the "
          "fastest repeat of each side, less sensitive to preemption on a loaded machine) "
          f"(reference: {max(1, repeats // ref_every)} runs, "
          "skipped for 64 removals at batch 8). Speed-up = other / engine (higher = engine faster). "
          "Cycle = append + accumulate + compress vs torch.cat + vectorised step.", "",
          md_table(["removed", "batch", "budget", "engine", "vectorised", "speed-up", "(of mins)", "reference",
                    "vs ref", "engine append", "torch.cat", "cycle speed-up"], comp_rows), "",
          "## decode attention: fused decode_attention vs sdpa on the same number of keys", "",
          "fused = output + statistics; speed-up = best sdpa / fused (>= 1: fused no slower); "
          "sdpa+stats = sdpa plus the statistics computed separately.", "",
          md_table(["batch", "keys", "fused", "sdpa (enable_gqa)", "sdpa (repeat_kv)",
                    "best sdpa / fused", "(of mins)", "sdpa + stats", "(sdpa+stats) / fused"], dec_rows)]
    payload = {"machine": info, "config": dict(H=H, G=G, D=D, sinks=SINKS, chunk=CHUNK, repeats=repeats,
                                               ref_every=ref_every, dtype="float32"),
               "compress": comp_json, "decode_attention": dec_json}
    j, m = write(args.out, payload, "\n".join(md))
    print(f"# wrote {j} and {m}; load {payload['machine']['loadavg_end']}")


if __name__ == "__main__":
    main()
