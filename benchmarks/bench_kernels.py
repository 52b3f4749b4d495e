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
(softmax(q K^T) recomputed, group mean, ``scores += p``, ``counts += 1``). The four are
interleaved ("mixed": sdpa's contiguous K/V are read by three of them and stay in cache, the slot
cache does not), then fused and sdpa (enable_gqa) again under two protocols that treat their data
alike: "warm" (an untimed call right before each timed one) and "cold" (an untimed 64 MiB write
before each timed call). ``--decode-only`` runs just this table (results/bench_decode_attention).

block attention (one prefill chunk step, #15): ``ops.block_attention`` (fused: output + statistics,
no probabilities stored) vs today's path of the integration (a float32 ``[B, H, G*Q, C]`` logits /
probabilities block with torch matmul + softmax, float32 copies of K/V when they are not float32,
then ``ops.accumulate``). Peak extra memory = the peak resident memory of one step above the
resident memory before it (the cache and inputs already allocated), each variant measured in a
fresh process (``/proc/self/clear_refs`` resets the peak); time = medians of interleaved repeats.
``--block-only`` runs just this part (``--quick``: B=2, budget 1024; full: B=8, budget 4096;
8 KV heads, G=4, D=128, Q=128, float32 and bfloat16).
"""
from __future__ import annotations

import argparse
import os
import subprocess
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
COLD_FLUSH_MIB = 64  # larger than the L2 + L3 a core of the development machine sees


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

    mixed = interleaved({"fused": fused, "sdpa_gqa": sdpa_gqa, "sdpa_repeat_kv": sdpa_repeat,
                         "sdpa_plus_stats": sdpa_stats}, repeats, warmup=2)
    # The mixed loop is not neutral about caches: three of its four variants read the same
    # contiguous K/V (ck, cv), so sdpa finds them in cache while the slot cache was evicted a loop
    # earlier. Two protocols that treat both alike: warm = one untimed call right before each
    # timed one (the data in cache); cold = an untimed write of COLD_FLUSH_MIB before each timed
    # call (the data in memory).
    flush = torch.zeros(COLD_FLUSH_MIB * 2**18)

    def warm(fn):
        def run():
            fn()
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return run

    def cold(fn):
        def run():
            flush.add_(1.0)
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return run

    for name, wrap in (("warm", warm), ("cold", cold)):
        r = interleaved({"fused": wrap(fused), "sdpa_gqa": wrap(sdpa_gqa)}, repeats, warmup=1)
        mixed[f"fused_{name}"], mixed[f"sdpa_gqa_{name}"] = r["fused"], r["sdpa_gqa"]
    return mixed



# ---- benchmark 3: one chunk step of block attention -----------------------------------------

BLOCK_Q = 128


def block_inputs(B: int, budget: int, Q: int, dtype: torch.dtype, seed: int = 0):
    """The slot cache after appending a chunk of Q tokens at positions budget .. budget + Q - 1
    (budget older tokens held), the chunk's queries and positions."""
    gen = torch.Generator().manual_seed(seed)
    C = budget + Q
    st = slot_state(B, C, C, gen)  # every slot held: positions 0 .. C-1
    st[0], st[1] = st[0].to(dtype), st[1].to(dtype)
    query = torch.randn(B, HQ, Q, D, generator=gen).to(dtype)
    qpos = torch.arange(budget, budget + Q).repeat(B, 1)
    return st, query, qpos


def todays_block_step(st, query, qpos, scale):
    """The integration's chunk attention before block_attention (attention.py, _block_attention):
    a float32 logits/probabilities block and float32 copies of K/V, then ops.accumulate."""
    keys, values, scores, counts, last, slot_pos = st
    B, Hq, Q, Dh = query.shape
    Hk, C = keys.shape[1], keys.shape[2]
    Gq = Hq // Hk
    q = query.reshape(B, Hk, Gq * Q, Dh).float()
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).mul_(scale)
    slots = slot_pos[:, :, None, :]
    visible = (slots >= 0) & (slots <= qpos[:, None, :, None])
    logits.view(B, Hk, Gq, Q, C).masked_fill_(~visible[:, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    sees_any = visible.any(-1)
    probs.view(B, Hk, Gq, Q, C).masked_fill_(~sees_any[:, :, None, :, None], 0.0)
    out = torch.matmul(probs, values.float())
    ops.accumulate(probs.view(B, Hq, Q, C), slot_pos, qpos, scores, counts, last)
    return out.view(B, Hq, Q, Dh).to(query.dtype)


def fused_block_step(st, query, qpos, scale):
    keys, values, scores, counts, last, slot_pos = st
    return ops.block_attention(query, keys, values, slot_pos, qpos, scores, counts, last, scale)


BLOCK_VARIANTS = {"today": todays_block_step, "block_attention": fused_block_step}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def block_peak_bytes_here(variant: str, dtype: str, B: int, budget: int, Q: int) -> int:
    """In this (fresh) process: peak resident bytes of one step above the resident bytes before."""
    st, query, qpos = block_inputs(B, budget, Q, getattr(torch, dtype))
    fn = BLOCK_VARIANTS[variant]
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed set-up temporaries leave the resident set
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = _rss_kib("VmRSS")
    out = fn(st, query, qpos, D ** -0.5)
    peak = _rss_kib("VmHWM")
    del out
    return (peak - before) * 1024


def block_peak_bytes(variant: str, dtype: str, B: int, budget: int, Q: int) -> int:
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--_block-mem", variant, dtype,
                          str(B), str(budget), str(Q)], capture_output=True, text=True,
                         timeout=1800, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return int(res.stdout.strip().split()[-1])


def bench_block(B: int, budget: int, Q: int, dtype: torch.dtype, repeats: int):
    """Peak extra memory (fresh processes) and time (interleaved) of one chunk step."""
    name = str(dtype).replace("torch.", "")
    mem = {v: block_peak_bytes(v, name, B, budget, Q) for v in BLOCK_VARIANTS}
    st, query, qpos = block_inputs(B, budget, Q, dtype)
    saved = [t.clone() for t in st[2:5]]

    def timed(fn):
        def run():
            for t, s in zip(st[2:5], saved):
                t.copy_(s)
            t0 = time.perf_counter()
            fn(st, query, qpos, D ** -0.5)
            return time.perf_counter() - t0
        return run

    t = interleaved({v: timed(fn) for v, fn in BLOCK_VARIANTS.items()}, repeats, warmup=1)
    cache_bytes = sum(x.numel() * x.element_size() for x in st)
    return mem, t, cache_bytes


def block_main(args, info):
    B, budget = (2, 1024) if args.quick else (8, 4096)
    if args.block_shape:
        B, budget = args.block_shape
    repeats = args.repeats or (3 if args.quick else 5)
    rows, js = [], []
    for dtype in (torch.float32, torch.bfloat16):
        mem, t, cache = bench_block(B, budget, BLOCK_Q, dtype, repeats)
        mt, mf = mem["today"], mem["block_attention"]
        tt, tf = t["today"]["median_s"], t["block_attention"]["median_s"]
        js.append(dict(batch=B, budget=budget, Q=BLOCK_Q, dtype=str(dtype), cache_bytes=cache,
                       today_peak_extra_bytes=mt, fused_peak_extra_bytes=mf,
                       memory_ratio=mf / max(mt, 1), today_s=tt, fused_s=tf, time_ratio=tf / tt))
        rows.append([str(dtype).replace("torch.", ""), B, budget, BLOCK_Q, f"{cache / 2**20:.0f} MiB",
                     f"{mt / 2**20:.1f} MiB", f"{mf / 2**20:.1f} MiB", f"**{mf / max(mt, 1):.3f}**",
                     fmt_time(tt), fmt_time(tf), f"**{tf / tt:.2f}x**"])
        print(f"block B={B} budget={budget} Q={BLOCK_Q} {dtype}: peak extra today {mt / 2**20:.1f} MiB, "
              f"block_attention {mf / 2**20:.1f} MiB (ratio {mf / max(mt, 1):.3f}); time today "
              f"{fmt_time(tt)}, block_attention {fmt_time(tf)} (ratio {tf / tt:.2f})", flush=True)
    md = ["## one chunk step: block_attention vs today's torch block + accumulate", "",
          f"8 KV heads, G=4, head_dim 128, every slot held (budget + Q). Peak extra memory: peak "
          f"resident memory of the step above the memory before it, each in a fresh process. "
          f"Time: medians of {repeats} interleaved repeats. Ratios: block_attention / today "
          "(memory target <= 0.10, time <= 1.0).", "",
          md_table(["dtype", "batch", "budget", "Q", "cache", "today peak extra",
                    "block_attention peak extra", "memory ratio", "today", "block_attention",
                    "time ratio"], rows)]
    j, m = write(args.out, {"machine": info, "block_attention": js}, "\n".join(md))
    print(f"# wrote {j} and {m}; load {info['loadavg_start']} -> {os.getloadavg()}")


def decode_table(budgets, repeats, gen):
    """The decode-attention comparison at batch 1 and 8 over the budgets: (markdown rows, json)."""
    dec_rows, dec_json = [], []
    for B in (1, 8):
        for N in budgets:
            r = bench_decode(B, N, repeats, gen)
            f_, s_ = r["fused"]["median_s"], r["sdpa_gqa"]["median_s"]
            sr, ss = r["sdpa_repeat_kv"]["median_s"], r["sdpa_plus_stats"]["median_s"]
            best = min(s_, sr)
            fm, bm = r["fused"]["min_s"], min(r["sdpa_gqa"]["min_s"], r["sdpa_repeat_kv"]["min_s"])
            warm = r["sdpa_gqa_warm"]["median_s"] / r["fused_warm"]["median_s"]
            cold = r["sdpa_gqa_cold"]["median_s"] / r["fused_cold"]["median_s"]
            dec_json.append(dict(batch=B, keys=N, **{f"{n}_s": x["median_s"] for n, x in r.items()},
                                 **{f"{n}_min_s": x["min_s"] for n, x in r.items()},
                                 fused_vs_best_sdpa_min=bm / fm,
                                 fused_vs_best_sdpa=best / f_, fused_vs_sdpa_plus_stats=ss / f_,
                                 fused_vs_sdpa_gqa_warm=warm, fused_vs_sdpa_gqa_cold=cold))
            dec_rows.append([B, N, fmt_time(f_), fmt_time(s_), fmt_time(sr), f"**{best / f_:.2f}x**",
                             f"{bm / fm:.2f}x", f"**{warm:.2f}x**", f"**{cold:.2f}x**",
                             fmt_time(ss), f"{ss / f_:.2f}x"])
            print(f"decode B={B} N={N:5d}: fused {fmt_time(f_)}  sdpa(gqa) {fmt_time(s_)}  "
                  f"sdpa(repeat_kv) {fmt_time(sr)}  sdpa+stats {fmt_time(ss)}; sdpa(gqa)/fused "
                  f"mixed {s_ / f_:.2f}, warm {warm:.2f}, cold {cold:.2f}", flush=True)
    return dec_rows, dec_json


def decode_md(dec_rows):
    return ["## decode attention: fused decode_attention vs sdpa on the same number of keys", "",
            "fused = output + statistics; speed-up = best sdpa / fused (>= 1: fused no slower); "
            "mixed = the four variants interleaved (sdpa's contiguous K/V are read by three of them, "
            "so they stay in cache, the slot cache does not); warm / cold = sdpa (enable_gqa) / "
            f"fused with each timed call preceded by an untimed call of itself (warm) or by a write "
            f"of {COLD_FLUSH_MIB} MiB (cold); sdpa+stats = sdpa plus the statistics computed "
            "separately.", "",
            md_table(["batch", "keys", "fused", "sdpa (enable_gqa)", "sdpa (repeat_kv)",
                      "best sdpa / fused (mixed)", "(of mins)", "warm", "cold", "sdpa + stats",
                      "(sdpa+stats) / fused"], dec_rows)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="budgets 256/1024 only, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per point (default 30; quick 10)")
    ap.add_argument("--ref-every", type=int, default=None,
                    help="run the reference every k-th repeat (default: 3 reference runs per point)")
    ap.add_argument("--threads", type=int, default=None, help="torch/at::parallel_for threads")
    ap.add_argument("--out", default=None,
                    help="results/<out>.json and .md (default bench_kernels, or bench_block with "
                         "--block-only)")
    ap.add_argument("--block-only", action="store_true",
                    help="only the chunk-step comparison of block_attention vs today's path")
    ap.add_argument("--block-shape", type=int, nargs=2, metavar=("BATCH", "BUDGET"), default=None,
                    help="batch and budget of the chunk-step comparison (default 8 4096; quick 2 1024)")
    ap.add_argument("--decode-only", action="store_true",
                    help="only the decode-attention table (results/bench_decode_attention)")
    ap.add_argument("--_block-mem", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._block_mem:
        v, dt, b, bud, q = args._block_mem
        print(block_peak_bytes_here(v, dt, int(b), int(bud), int(q)))
        return
    args.out = args.out or ("bench_block" if args.block_only else "bench_kernels")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (10 if args.quick else 30)
    ref_every = args.ref_every or max(1, repeats // 3)
    budgets = [256, 1024] if args.quick else [256, 1024, 4096]
    gen = torch.Generator().manual_seed(0)
    info = machine()
    print(f"# machine: {info['nproc']} CPUs, {info['cpu_model']}, threads={info['torch_threads']}, "
          f"load {info['loadavg_start']}", flush=True)
    if args.block_only:
        block_main(args, info)
        return
    if args.decode_only:
        dec_rows, dec_json = decode_table(budgets, repeats, gen)
        out = args.out if args.out != "bench_kernels" else "bench_decode_attention"
        j, m = write(out, {"machine": info, "config": dict(H=H, G=G, D=D, repeats=repeats,
                                                            dtype="float32"),
                           "decode_attention": dec_json}, "\n".join(decode_md(dec_rows)))
        print(f"# wrote {j} and {m}; load {info['loadavg_end']}")
        return

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

    dec_rows, dec_json = decode_table(budgets, repeats, gen)

    md = ["## accumulate + compress (weightedkv policy, float32, 8 KV heads, head_dim 128)", "",
          f"Medians of {repeats} interleaved repeats (the '(of mins)' column: the same ratio from the "
          "fastest repeat of each side, less sensitive to preemption on a loaded machine) "
          f"(reference: {max(1, repeats // ref_every)} runs, "
          "skipped for 64 removals at batch 8). Speed-up = other / engine (higher = engine faster). "
          "Cycle = append + accumulate + compress vs torch.cat + vectorised step.", "",
          md_table(["removed", "batch", "budget", "engine", "vectorised", "speed-up", "(of mins)", "reference",
                    "vs ref", "engine append", "torch.cat", "cycle speed-up"], comp_rows), "",
          *decode_md(dec_rows)]
    payload = {"machine": info, "config": dict(H=H, G=G, D=D, sinks=SINKS, chunk=CHUNK, repeats=repeats,
                                               ref_every=ref_every, dtype="float32"),
               "compress": comp_json, "decode_attention": dec_json}
    j, m = write(args.out, payload, "\n".join(md))
    print(f"# wrote {j} and {m}; load {payload['machine']['loadavg_end']}")
    args.out = "bench_block"
    block_main(args, machine())


if __name__ == "__main__":
    main()
