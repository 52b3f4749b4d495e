"""GPU kernel benchmark: decode-step compress (1 removal) and the fused decode attention.

    python benchmarks/gpu_kernels.py [--quick] [--iters N] [--group G]

Shapes: batch 1/8/32 x KV heads 8/32 x budgets 256/1024/4096, head_dim 128, float16, GQA group
4 (query heads = 4 x KV heads); policy weightedkv, sinks 4, recent = budget // 2 - 4 (the rule of
benchmarks/bench_kernels.py). The cache has C = budget + 1 slots, all held, positions scattered
over the slots at random (as after many steps), i.e. the state of a decode step right after
``append``: ``decode_attention`` attends over the C slots, then ``compress`` removes one token.

Timing: CUDA events around each call (median of --iters after 3 warm-ups); compress mutates its
state, so the state is restored before every call, outside the timed region. Achieved bandwidth =
bytes the op must touch / time, against the device peak (memory clock x 2 x bus width, from the
device properties; a table of known GPUs as fallback). Bytes touched per (b, KV head):
  compress:  slot_pos + scores + counts read (16 C) + the merge (read v_j, v_r, write v_r: 3 D x 2)
  decode:    keys + values (2 C D x 2) + slot_pos (8 C) + scores/counts read+write, last write
             (20 C) + queries and outputs (2 G D x 2)
torch's scaled_dot_product_attention over the same contiguous K/V (no statistics, no slot mask)
is timed as a yardstick. Results: benchmarks/results/gpu_kernels.{json,md}.
"""
from __future__ import annotations

import argparse
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
DTYPE = torch.float16
SINKS = 4

# Peak DRAM bandwidth (bytes/s) of known GPUs, used when the device properties lack the clock.
PEAK_TABLE = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
              "A100": 1.555e12, "L40S": 0.864e12}


def recent_for(budget: int) -> int:
    return budget // 2 - 4


def peak_bandwidth(props) -> tuple[float, str]:
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz > 0 and bus_bits > 0:
        return clock_khz * 1e3 * 2 * bus_bits / 8, (
            f"memory clock {clock_khz / 1e3:.0f} MHz x 2 x {bus_bits}-bit bus")
    for name, peak in PEAK_TABLE.items():
        if name in props.name:
            return peak, f"table entry '{name}'"
    return float("nan"), "unknown (no clock in the device properties, GPU not in the table)"


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


def bench_config(B, H, G, budget, iters, gen, peak) -> list[dict]:
    C = budget + 1
    keys, values, scores, counts, last, slot_pos = make_cache(B, H, C, gen)
    saved = [t.clone() for t in (scores, counts, last, slot_pos)]
    recent = recent_for(budget)
    rows = []

    def record(op, t, nbytes):
        gbps = nbytes / t["median_s"] / 1e9
        rows.append({"op": op, "B": B, "H": H, "G": G, "budget": budget, "C": C,
                     **t, "bytes": nbytes, "GB_per_s": gbps,
                     "frac_of_peak": nbytes / t["median_s"] / peak})
        print(f"  {op:<18} B={B:<3} H={H:<3} budget={budget:<5} {fmt_time(t['median_s']):>10}  "
              f"{gbps:8.1f} GB/s  {100 * rows[-1]['frac_of_peak']:5.1f}% of peak", flush=True)

    # compress: one removal per (b, h)
    def restore():
        for dst, src in zip((scores, counts, last, slot_pos), saved):
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
    record("compress (1 rm)", t, B * H * (16 * C + 3 * D * 2))

    # fused decode attention over the C slots (stats updated in place: no restore needed)
    restore()
    query = torch.randn(B, H * G, D, device="cuda", dtype=DTYPE, generator=gen)
    query_pos = torch.full((B,), C, dtype=torch.long, device="cuda")
    scale = D ** -0.5

    def decode():
        ops.decode_attention(query, keys, values, slot_pos, query_pos, scores, counts, last,
                             scale)

    t = time_calls(decode, lambda: None, iters)
    record("decode_attention", t, B * H * (2 * C * D * 2 + 28 * C + 2 * G * D * 2))

    # yardstick: torch sdpa over the same contiguous K/V (no statistics)
    q4 = query[:, :, None, :]
    try:
        def sdpa():
            F.scaled_dot_product_attention(q4, keys, values, scale=scale, enable_gqa=True)
        sdpa()
        t = time_calls(sdpa, lambda: None, iters)
        record("sdpa (yardstick)", t, B * H * (2 * C * D * 2 + 2 * G * D * 2))
    except (RuntimeError, TypeError) as e:  # an older torch without enable_gqa
        print(f"  sdpa yardstick skipped: {e}", flush=True)
    del keys, values, scores, counts, last, slot_pos, saved, query
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 1/32, budgets 256/4096, 5 iters")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--name", default="gpu_kernels", help="results file name (no extension)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels.py: no CUDA device (torch.cuda.is_available() is False)")
    if not _loader.cuda_built():
        sys.exit("gpu_kernels.py: weightedkv_ext was built without CUDA kernels "
                 "(run scripts/gpu_check.sh, which builds them)")
    batches, budgets, iters = [1, 8, 32], [256, 1024, 4096], args.iters
    if args.quick:
        batches, budgets, iters = [1, 32], [256, 4096], min(iters, 5)
    props = torch.cuda.get_device_properties(0)
    peak, peak_src = peak_bandwidth(props)
    gpu = {"name": props.name, "sm_count": props.multi_processor_count,
           "memory_GiB": round(props.total_memory / 2 ** 30, 1), "peak_bytes_per_s": peak,
           "peak_source": peak_src, "cuda": torch.version.cuda,
           "capability": f"{props.major}.{props.minor}"}
    print(f"{props.name}: {props.multi_processor_count} SMs, peak {peak / 1e12:.2f} TB/s "
          f"({peak_src})", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for B in batches:
        for H in (8, 32):
            for budget in budgets:
                rows += bench_config(B, H, args.group, budget, iters, gen, peak)
    table = md_table(
        ["op", "B", "KV heads", "budget", "time / call", "bytes", "GB/s", "% of peak"],
        [[r["op"], r["B"], r["H"], r["budget"], fmt_time(r["median_s"]),
          f"{r['bytes'] / 1e6:.2f} MB", f"{r['GB_per_s']:.0f}", f"{100 * r['frac_of_peak']:.1f}"]
         for r in rows])
    md = (f"GPU: {props.name} ({props.multi_processor_count} SMs, capability "
          f"{gpu['capability']}), peak DRAM bandwidth {peak / 1e12:.2f} TB/s ({peak_src}); "
          f"CUDA {torch.version.cuda}. head_dim {D}, float16, GQA group {args.group}, "
          f"policy weightedkv, sinks {SINKS}, recent budget//2-4; median of {iters} calls "
          f"(CUDA events).\n\n" + table)
    payload = {"machine": machine(), "gpu": gpu, "config": {"head_dim": D, "dtype": "float16",
               "group": args.group, "iters": iters, "sinks": SINKS}, "rows": rows}
    jpath, mpath = write(args.name, payload, md)
    print(f"\nwrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
