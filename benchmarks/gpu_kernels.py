"""GPU kernel benchmark: fused decode attention (achieved bandwidth against the HBM peak) and
compress (time per removal).

    python benchmarks/gpu_kernels.py [--quick] [--iters N] [--group G] [--peak-tbps X]

Decode attention: batch 1/2/4/8/16/32 x budgets 1024/2048/4096, 8 KV heads, head_dim 128,
float16, GQA group 4 (32 query heads, a Llama-3-8B layer). The cache has C = budget + 1 slots,
all held, positions scattered over the slots (the state of a decode step right after ``append``).
Three kernels read the same caches:
  decode_attention   the split (flash-decoding) kernel: (row, split) blocks + a combine kernel;
  block_attention    with one query: the one-block-per-(b, KV head) kernel decode_attention used
                     before (kept for chunks of queries), the "old" column;
  sdpa               torch's scaled_dot_product_attention over the same contiguous K/V (no
                     statistics, no slot mask): a yardstick of what a tuned library reaches.
Bytes an attention call must touch per (b, KV head): keys + values (2 C D x 2), slot_pos (8 C),
scores and counts read and written and last written (20 C), queries and outputs (2 G D x 2);
sdpa: keys + values + queries + outputs. The split kernel's float32 workspace (e = exp(l - m) per
slot and head, the per-split partials) is overhead, not counted. Calls run back to back
(``--iters`` per timed batch, CUDA events around the batch, median of 5 batches) over enough
copies of the cache to exceed 3x the L2 cache, so every call reads K/V from HBM, not L2.

Compress: one call removing k tokens per (b, KV head) (k = 1: a decode step; k = 64: a prefill
chunk), policy weightedkv, sinks 4, recent budget // 2 - 4; the state is restored before every
call, outside the timed region (CUDA events around one call, median of ``--iters``). Reported as
time per call and time per removal (call time / k).

Peak bandwidth: --peak-tbps, else $WKV_PEAK_TBPS, else the table PEAK_TBPS by device name (H200:
4.8 TB/s, the datasheet figure), else memory clock x 2 x bus width from the device properties.
Results: benchmarks/results/<--name>.{json,md}; the last line printed is a one-line summary.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from weightedkv_ext import _loader, ops  # noqa: E402

from _common import fmt_time, machine, md_table, write  # noqa: E402

D = 128
KV_HEADS = 8
DTYPE = torch.float16
SINKS = 4

# Datasheet HBM bandwidth (TB/s) by device name: the first entry contained in the name wins, so
# the more specific names come first.
PEAK_TBPS = [("GH200", 4.0), ("H200", 4.8), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35),
             ("H800", 3.35), ("B200", 8.0), ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935),
             ("A100", 1.555), ("L40S", 0.864), ("A10G", 0.6)]


def recent_for(budget: int) -> int:
    return budget // 2 - 4


def peak_bandwidth(props, override: float | None) -> tuple[float, str]:
    """Bytes/s and where the figure comes from."""
    if override:
        return override * 1e12, "--peak-tbps"
    env = os.environ.get("WKV_PEAK_TBPS")
    if env:
        return float(env) * 1e12, "$WKV_PEAK_TBPS"
    for name, tbps in PEAK_TBPS:
        if name in props.name:
            return tbps * 1e12, f"datasheet table entry '{name}'"
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz > 0 and bus_bits > 0:
        return clock_khz * 1e3 * 2 * bus_bits / 8, (
            f"memory clock {clock_khz / 1e3:.0f} MHz x 2 x {bus_bits}-bit bus")
    return float("nan"), "unknown (not in the table, no clock in the device properties)"


def time_batches(fn, iters: int, batches: int = 5, warmup: int = 2) -> dict:
    """Seconds per call of fn(i) (i = 0 .. iters-1, back to back), median over `batches` batches
    timed with CUDA events."""
    for i in range(warmup):
        fn(i)
    per_call = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            fn(i)
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 1e3 / iters)
    return {"median_s": statistics.median(per_call), "min_s": min(per_call), "n": batches * iters}


def time_calls(fn, setup, iters: int, warmup: int = 3) -> dict:
    """Median/min seconds of fn() over iters calls, setup() before each call, untimed."""
    for _ in range(warmup):
        setup()
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, end in events:
        setup()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    ts = [s.elapsed_time(e) / 1e3 for s, e in events]
    return {"median_s": statistics.median(ts), "min_s": min(ts), "n": iters}


def make_cache(B, H, C, gen):
    dev = "cuda"
    keys = torch.randn(B, H, C, D, device=dev, dtype=DTYPE, generator=gen)
    values = torch.randn(B, H, C, D, device=dev, dtype=DTYPE, generator=gen)
    slot_pos = torch.argsort(torch.rand(B, H, C, device=dev, generator=gen), dim=-1)
    counts = torch.randint(1, 100, (B, H, C), device=dev, generator=gen).float()
    scores = torch.rand(B, H, C, device=dev, generator=gen) * counts
    last = torch.rand(B, H, C, device=dev, generator=gen)
    return keys, values, scores, counts, last, slot_pos


def bench_decode(B, G, budget, iters, gen, peak, l2_bytes) -> list[dict]:
    H, C = KV_HEADS, budget + 1
    nbytes = B * H * (2 * C * D * 2 + 28 * C + 2 * G * D * 2)
    sdpa_bytes = B * H * (2 * C * D * 2 + 2 * G * D * 2)
    copies = max(1, min(64, math.ceil(3 * l2_bytes / (B * H * 2 * C * D * 2))))
    caches = [make_cache(B, H, C, gen) for _ in range(copies)]
    query = torch.randn(B, H * G, D, device="cuda", dtype=DTYPE, generator=gen)
    q4 = query[:, :, None, :]
    qpos = torch.full((B,), C, dtype=torch.long, device="cuda")
    qpos4 = qpos[:, None]
    out = torch.empty_like(query)
    out4 = torch.empty_like(q4)
    scale = D ** -0.5

    def split(i):
        k, v, s, n, last, pos = caches[i % copies]
        ops.decode_attention(query, k, v, pos, qpos, s, n, last, scale, out=out)

    def block(i):
        k, v, s, n, last, pos = caches[i % copies]
        ops.block_attention(q4, k, v, pos, qpos4, s, n, last, scale, out=out4)

    def sdpa(i):
        k, v = caches[i % copies][:2]
        F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    rows = []
    times = {"decode_attention": time_batches(split, iters),
             "block_attention": time_batches(block, iters)}
    try:
        times["sdpa"] = time_batches(sdpa, iters)
    except (RuntimeError, TypeError) as e:  # an older torch without enable_gqa
        print(f"  sdpa yardstick skipped: {e}", flush=True)
    for op, t in times.items():
        b = sdpa_bytes if op == "sdpa" else nbytes
        rows.append({"op": op, "B": B, "H": H, "G": G, "budget": budget, "C": C, **t,
                     "bytes": b, "GB_per_s": b / t["median_s"] / 1e9,
                     "frac_of_peak": b / t["median_s"] / peak, "cache_copies": copies})
    new, old = times["decode_attention"]["median_s"], times["block_attention"]["median_s"]
    for r in rows:
        r["speedup_vs_block"] = old / r["median_s"]
    line = "  ".join(f"{r['op']} {fmt_time(r['median_s']):>9} {r['GB_per_s']:7.0f} GB/s "
                     f"{100 * r['frac_of_peak']:5.1f}%" for r in rows)
    print(f"  decode B={B:<3} budget={budget:<5} {line}  split/old speed-up {old / new:5.2f}x",
          flush=True)
    del caches
    torch.cuda.empty_cache()
    return rows


def bench_compress(B, budget, k, iters, gen) -> dict:
    H = KV_HEADS
    C = budget + k
    keys, values, scores, counts, last, slot_pos = make_cache(B, H, C, gen)
    saved = [t.clone() for t in (values, scores, counts, last, slot_pos)]
    recent = recent_for(budget)

    def restore():
        for dst, src in zip((values, scores, counts, last, slot_pos), saved):
            dst.copy_(src)

    def compress():
        ops.compress(keys, values, scores, counts, last, slot_pos, budget, SINKS, recent,
                     "weightedkv")

    t = time_calls(compress, restore, iters)
    restore()
    compress()
    torch.cuda.synchronize()
    held = int((slot_pos >= 0).sum(-1).max())
    assert held == budget, f"compress left {held} tokens, expected {budget}"
    row = {"op": f"compress (k={k})", "B": B, "H": H, "budget": budget, "C": C, "k": k, **t,
           "per_removal_s": t["median_s"] / k}
    print(f"  compress B={B:<3} budget={budget:<5} k={k:<3} {fmt_time(t['median_s']):>9} / call  "
          f"{fmt_time(row['per_removal_s']):>9} / removal", flush=True)
    del keys, values, scores, counts, last, slot_pos, saved
    torch.cuda.empty_cache()
    return row


def summary(rows: list[dict], peak: float) -> str:
    dec = [r for r in rows if r["op"] == "decode_attention"]
    old = [r for r in rows if r["op"] == "block_attention"]
    comp = [r for r in rows if r["op"].startswith("compress")]
    parts = []
    if dec:
        lo = min(dec, key=lambda r: r["frac_of_peak"])
        hi = max(dec, key=lambda r: r["frac_of_peak"])
        parts.append(f"decode {lo['GB_per_s']:.0f}-{hi['GB_per_s']:.0f} GB/s = "
                     f"{100 * lo['frac_of_peak']:.0f}-{100 * hi['frac_of_peak']:.0f}% of "
                     f"{peak / 1e12:.2f} TB/s (min at B={lo['B']} budget={lo['budget']}, max at "
                     f"B={hi['B']} budget={hi['budget']})")
    if dec and old:
        sp = [o["median_s"] / d["median_s"] for d, o in zip(dec, old)]
        parts.append(f"split vs old kernel {min(sp):.1f}-{max(sp):.1f}x")
    for k in sorted({r["k"] for r in comp}):
        rs = [r for r in comp if r["k"] == k]
        worst = max(rs, key=lambda r: r["per_removal_s"])
        parts.append(f"compress k={k}: up to {worst['per_removal_s'] * 1e6:.1f} us/removal "
                     f"(B={worst['B']} budget={worst['budget']})")
    return "; ".join(parts)


def markdown(rows: list[dict], props, peak: float, peak_src: str, group: int, iters: int) -> str:
    att = [r for r in rows if "GB_per_s" in r]
    comp = [r for r in rows if "per_removal_s" in r]
    return (f"GPU: {props.name} ({props.multi_processor_count} SMs, capability "
            f"{props.major}.{props.minor}), peak HBM bandwidth {peak / 1e12:.2f} TB/s "
            f"({peak_src}); "
            f"CUDA {torch.version.cuda}, torch {torch.__version__}. head_dim {D}, float16, "
            f"{KV_HEADS} KV heads, GQA group {group}; attention: {iters} back-to-back calls "
            f"per CUDA-event batch over cache copies > 3x L2, median of 5 batches; compress: "
            f"policy weightedkv, sinks {SINKS}, recent budget//2-4, median of {iters} calls.\n\n"
            + md_table(["op", "B", "budget", "time / call", "MB touched", "GB/s", "% of peak",
                        "speed-up vs block kernel"],
                       [[r["op"], r["B"], r["budget"], fmt_time(r["median_s"]),
                         f"{r['bytes'] / 1e6:.1f}", f"{r['GB_per_s']:.0f}",
                         f"{100 * r['frac_of_peak']:.1f}", f"{r['speedup_vs_block']:.2f}x"]
                        for r in att])
            + "\n\n" + md_table(["op", "B", "budget", "time / call", "time / removal"],
                                [[r["op"], r["B"], r["budget"], fmt_time(r["median_s"]),
                                  fmt_time(r["per_removal_s"])] for r in comp]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 1/32, budgets 1024/4096")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--peak-tbps", type=float, default=None,
                    help="HBM peak in TB/s (default: $WKV_PEAK_TBPS, else the table by name)")
    ap.add_argument("--name", default="gpu_kernels", help="results file name (no extension)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels.py: no CUDA device (torch.cuda.is_available() is False)")
    if not _loader.cuda_built():
        sys.exit("gpu_kernels.py: weightedkv_ext was built without CUDA kernels "
                 "(run scripts/gpu_check.sh, which builds them)")
    batches, budgets, iters = [1, 2, 4, 8, 16, 32], [1024, 2048, 4096], args.iters
    if args.quick:
        batches, budgets = [1, 32], [1024, 4096]
    props = torch.cuda.get_device_properties(0)
    peak, peak_src = peak_bandwidth(props, args.peak_tbps)
    l2 = getattr(props, "L2_cache_size", 0) or 64 * 2 ** 20
    gpu = {"name": props.name, "sm_count": props.multi_processor_count,
           "memory_GiB": round(props.total_memory / 2 ** 30, 1), "peak_bytes_per_s": peak,
           "peak_source": peak_src, "l2_bytes": l2, "cuda": torch.version.cuda,
           "capability": f"{props.major}.{props.minor}"}
    print(f"{props.name}: {props.multi_processor_count} SMs, L2 {l2 / 2 ** 20:.0f} MiB, peak "
          f"{peak / 1e12:.2f} TB/s ({peak_src})", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for B in batches:
        for budget in budgets:
            rows += bench_decode(B, args.group, budget, iters, gen, peak, l2)
    for B in (1, 32):
        for budget in (1024, 4096):
            for k in (1, 64):
                rows.append(bench_compress(B, budget, k, iters, gen))
    md = markdown(rows, props, peak, peak_src, args.group, iters)
    line = summary(rows, peak)
    payload = {"machine": machine(), "gpu": gpu,
               "config": {"head_dim": D, "kv_heads": KV_HEADS, "dtype": "float16",
                          "group": args.group, "iters": iters, "sinks": SINKS},
               "rows": rows, "summary": line}
    jpath, mpath = write(args.name, payload, md + f"\n\nSummary: {line}")
    print(f"\nwrote {jpath} and {mpath}")
    print(f"SUMMARY {line}")


if __name__ == "__main__":
    main()
