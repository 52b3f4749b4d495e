"""Decode-step breakdown (CPU): one SmolLM2-135M decode step with a WeightedKVCache at budgets
256 and 1024, and the share of the step spent in the cache's ops.

    .venv/bin/python benchmarks/bench_decode_step.py [--quick] [--context N] [--steps N] [--threads T]

After a chunked prefill of ``--context`` tokens of the embedded text (so the caches are full and
every step compresses), decode steps of the budget-256, budget-1024 and full (DynamicCache + sdpa)
models run interleaved. Explicit perf_counter timers around every op call (the cache's ``ops`` is
a timing proxy) and around the registered ``weightedkv`` attention function give, per step:
append, decode_attention (attention + fused score accumulation), compress, and the Python glue of
the attention function (its time minus the ops). Score accumulation is fused into
decode_attention and cannot be timed apart; its cost is bounded by timing the standalone
``accumulate`` op on the same shapes (probabilities ``[1, 9, 1, C]`` per layer), which is what the
"compress + accumulation" share uses. A second table times the attention op alone at SmolLM2's
shapes (3 KV heads, 9 query heads, head_dim 64): fused decode_attention over the slot cache vs
transformers' sdpa attention on a contiguous cache with the same number of keys.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from transformers import DynamicCache  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface  # noqa: E402

from weightedkv_ext import ops  # noqa: E402

import _model  # noqa: E402
from _common import fmt_time, interleaved, machine, md_table, write  # noqa: E402

OPS = ("append", "decode_attention", "compress", "accumulate")


class AttnTimer:
    """Wraps the registered ``weightedkv`` attention function with a perf_counter timer."""

    def __init__(self):
        self.inner = ALL_ATTENTION_FUNCTIONS["weightedkv"]
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out


def accumulate_estimate(cache, repeats: int = 30) -> float:
    """Seconds per step of the standalone accumulate op on every layer's shapes (upper bound of
    the statistics work fused into decode_attention)."""
    total = 0.0
    gen = torch.Generator().manual_seed(0)
    layer = cache.layers[0]
    keys, values, scores, counts, last, slot_pos = (t.clone() for t in layer.state)
    B, H, C, _ = keys.shape
    hq = 9
    probs = torch.softmax(torch.randn(B, hq, 1, C, generator=gen), -1)
    qpos = torch.full((B, 1), int(slot_pos.max()), dtype=torch.int64)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ops.accumulate(probs, slot_pos, qpos, scores, counts, last)
        ts.append(time.perf_counter() - t0)
    total = statistics.median(ts) * len(cache.layers)
    return total


def attention_shapes(budgets, repeats, gen):
    """decode_attention (slot cache, budget held of budget + 128 slots) vs transformers' sdpa on
    the same number of contiguous keys; SmolLM2 shapes, batch 1."""
    H, G, D = 3, 3, 64
    rows = []
    for n in budgets:
        C = n + 128
        keys, values = torch.randn(1, H, C, D, generator=gen), torch.randn(1, H, C, D, generator=gen)
        slot_pos = torch.full((1, H, C), -1, dtype=torch.int64)
        perm = torch.rand(1, H, C, generator=gen).argsort(-1)[..., :n]
        slot_pos.scatter_(-1, perm, torch.arange(n).expand(1, H, n).contiguous())
        st = torch.zeros(1, H, C), torch.zeros(1, H, C), torch.zeros(1, H, C)
        q = torch.randn(1, H * G, D, generator=gen)
        qpos = torch.tensor([n - 1])
        ck, cv = torch.randn(1, H, n, D, generator=gen), torch.randn(1, H, n, D, generator=gen)
        q4 = q[:, :, None]
        module = type("M", (), {"num_key_value_groups": G, "is_causal": True, "training": False})()

        def fused():
            ops.decode_attention(q, keys, values, slot_pos, qpos, *st, D ** -0.5)

        def sdpa():
            sdpa_attention_forward(module, q4, ck, cv, None, scaling=D ** -0.5)

        r = interleaved({"decode_attention": fused, "sdpa": sdpa}, repeats, warmup=3)
        f, s = r["decode_attention"]["median_s"], r["sdpa"]["median_s"]
        rows.append(dict(keys=n, decode_attention_s=f, sdpa_s=s, sdpa_over_fused=s / f))
    return rows



def compiled_main(args):
    """``--compiled``: SmolLM2 decode tokens/s, ``torch.compile(model)`` vs eager, same run.

    Two WeightedKVCache(budget) caches prefilled alike (eager), then decode steps of the eager
    and the compiled model interleaved (after the compiled warm-up steps); prints the ratio and
    how many graphs / graph breaks / recompiles dynamo reported.
    """
    from torch._dynamo.utils import counters
    from weightedkv_ext import WeightedKVCache
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = _model.load()
    context = args.context or (512 if args.quick else 1024)
    steps = args.steps or (8 if args.quick else 16)
    budget = args.budgets[0]
    ids = _model.token_ids(tok, context, 1)
    caches = [WeightedKVCache(budget) for _ in range(2)]
    nxt = [_model.prefill(model, ids, c) for c in caches]
    compiled = torch.compile(model, backend=args.backend)
    t0 = time.perf_counter()
    for _ in range(3):  # compile + warm-up (recompiles, if any, show here)
        nxt[1] = _model.step(compiled, nxt[1], caches[1])
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        nxt[0] = _model.step(model, nxt[0], caches[0])

    def run(i, m):
        def f():
            t = time.perf_counter()
            nxt[i] = _model.step(m, nxt[i], caches[i])
            return time.perf_counter() - t
        return f

    r = interleaved({"eager": run(0, model), "compiled": run(1, compiled)}, steps, warmup=0)
    te, tc = r["eager"]["median_s"], r["compiled"]["median_s"]
    stats = {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "recompiles")}
    info = machine()
    row = [context, budget, args.backend, f"{compile_s:.1f} s", f"{1 / te:.1f}", f"{1 / tc:.1f}",
           f"**{te / tc:.2f}x**", len(counters["graph_break"]),
           counters["stats"].get("unique_graphs", 0)]
    print(f"compiled decode: context {context}, budget {budget}, backend {args.backend}: eager "
          f"{1 / te:.1f} tok/s, compiled {1 / tc:.1f} tok/s ({te / tc:.2f}x); compile+warm-up "
          f"{compile_s:.1f} s; dynamo {stats}", flush=True)
    md = ["## SmolLM2 decode, torch.compile(model) vs eager (WeightedKVCache)", "",
          f"Batch 1, medians of {steps} interleaved steps after 3 compiled warm-up steps.", "",
          md_table(["context", "budget", "backend", "compile + warm-up", "eager tok/s",
                    "compiled tok/s", "compiled / eager", "graph breaks", "graphs"], [row])]
    j, m = write(args.out + "_compiled", {"machine": info, "eager_s": te, "compiled_s": tc,
                                          "compile_s": compile_s, "dynamo": stats,
                                          "context": context, "budget": budget,
                                          "backend": args.backend}, "\n".join(md))
    print(f"# wrote {j} and {m}")

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="context 1280, 6 steps")
    ap.add_argument("--context", type=int, default=None, help="prefill tokens (default 2048)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 16)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench_decode_step")
    ap.add_argument("--compiled", action="store_true",
                    help="only: decode tokens/s of torch.compile(model) vs eager (budget: the "
                         "first of --budgets; context default 1024)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend for --compiled")
    args = ap.parse_args()
    if args.compiled:
        compiled_main(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    context = args.context or (1280 if args.quick else 2048)
    steps = args.steps or (6 if args.quick else 16)
    info = machine()
    print(f"# machine: {info['nproc']} CPUs, {info['cpu_model']}, threads={info['torch_threads']}, "
          f"load {info['loadavg_start']}", flush=True)

    model, tok = _model.load()
    timer = AttnTimer()
    AttentionInterface.register("weightedkv", timer)
    ids = _model.token_ids(tok, context, 1)
    caches = {f"weightedkv-{b}": _model.TimedCache(b) for b in args.budgets}
    caches["full"] = DynamicCache()
    nxt = {}
    for name, cache in caches.items():
        t0 = time.perf_counter()
        nxt[name] = _model.prefill(model, ids, cache)
        print(f"prefill {name}: {context} tokens in {time.perf_counter() - t0:.1f} s", flush=True)

    per = {name: {"step": [], "attn_fn": [], **{o: [] for o in OPS}} for name in caches}
    for _ in range(steps + 1):  # the first round is a warm-up
        for name, cache in caches.items():
            timed = isinstance(cache, _model.TimedCache)
            if timed:
                cache.timer.reset()
            timer.seconds = 0.0
            t0 = time.perf_counter()
            nxt[name] = _model.step(model, nxt[name], cache)
            dt = time.perf_counter() - t0
            per[name]["step"].append(dt)
            if timed:
                per[name]["attn_fn"].append(timer.seconds)
                for o in OPS:
                    per[name][o].append(cache.timer.seconds.get(o, 0.0))
    med = {name: {k: statistics.median(v[1:]) for k, v in d.items() if v} for name, d in per.items()}

    rows, res = [], []
    full_step = med["full"]["step"]
    for b in args.budgets:
        name = f"weightedkv-{b}"
        m = med[name]
        acc = accumulate_estimate(caches[name])
        step = m["step"]
        glue = m["attn_fn"] - m["append"] - m["decode_attention"] - m["compress"]
        share = (m["compress"] + acc) / step
        r = dict(budget=b, context=context, step_s=step, full_step_s=full_step, **{f"{o}_s": m[o] for o in OPS},
                 accumulate_standalone_s=acc, attention_fn_s=m["attn_fn"], python_glue_s=glue,
                 compress_plus_accumulation_share=share,
                 ops_share=(m["append"] + m["decode_attention"] + m["compress"]) / step)
        res.append(r)
        pct = lambda x: f"{100 * x / step:.1f}%"  # noqa: E731
        rows.append([b, fmt_time(step), fmt_time(full_step), f"{fmt_time(m['compress'])} ({pct(m['compress'])})",
                     f"{fmt_time(acc)} ({pct(acc)})", f"**{100 * share:.1f}%**",
                     f"{fmt_time(m['append'])} ({pct(m['append'])})",
                     f"{fmt_time(m['decode_attention'])} ({pct(m['decode_attention'])})",
                     f"{fmt_time(glue)} ({pct(glue)})"])
        print(f"budget {b}: step {fmt_time(step)} (full {fmt_time(full_step)}); compress {pct(m['compress'])}, "
              f"accumulate(standalone) {pct(acc)}, append {pct(m['append'])}, decode_attention "
              f"{pct(m['decode_attention'])}, python glue {pct(glue)}", flush=True)

    gen = torch.Generator().manual_seed(0)
    att = attention_shapes(args.budgets, 40 if not args.quick else 15, gen)
    att_rows = [[a["keys"], fmt_time(a["decode_attention_s"]), fmt_time(a["sdpa_s"]),
                 f"**{a['sdpa_over_fused']:.2f}x**"] for a in att]
    for a in att:
        print(f"attention op, {a['keys']} keys: decode_attention {fmt_time(a['decode_attention_s'])}, "
              f"sdpa {fmt_time(a['sdpa_s'])}", flush=True)

    md = [f"## SmolLM2-135M decode step (float32, batch 1, context {context} tokens, medians of {steps} "
          "interleaved steps)", "",
          "compress/append/decode_attention: explicit timers around the op calls of all 30 layers; "
          "accumulation: fused into decode_attention, bounded by the standalone accumulate op on the "
          "same shapes; glue: the rest of the weightedkv attention function (Python + small torch ops); "
          "full: DynamicCache + sdpa at the same context.", "",
          md_table(["budget", "step", "full step", "compress", "accumulate (standalone)",
                    "compress + accumulation", "append", "decode_attention (incl. stats)", "glue"], rows),
          "", "## attention op at SmolLM2 shapes (batch 1, 3 KV heads, 9 query heads, head_dim 64)", "",
          "sdpa: transformers' sdpa_attention_forward on a contiguous cache with the same number of keys "
          "(no statistics).", "",
          md_table(["keys", "decode_attention (fused, + stats)", "sdpa", "sdpa / fused"], att_rows)]
    payload = {"machine": info, "config": dict(context=context, steps=steps, budgets=args.budgets),
               "decode_step": res, "attention_op": att}
    j, mpath = write(args.out, payload, "\n".join(md))
    print(f"# wrote {j} and {mpath}; load {payload['machine']['loadavg_end']}")


if __name__ == "__main__":
    main()
