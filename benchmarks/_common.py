"""Shared helpers of the CPU benchmarks: machine description, interleaved timing, JSON/Markdown output.

Timing protocol (the machine is shared with other jobs): every variant of one comparison is run
in the same loop, interleaved (A, B, C, A, B, C, ...), and the medians of the repeats are compared,
so a change of background load hits every variant alike. The 1-minute load average is recorded
before and after each benchmark.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "loadavg_start": loadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": " ".join(sys.argv),
    }


def interleaved(variants: dict[str, Callable[[], float | None]], repeats: int,
                warmup: int = 1, only_every: dict[str, int] | None = None) -> dict[str, dict]:
    """Run the variants interleaved ``repeats`` times; each returns its own elapsed seconds
    (so that untimed set-up such as restoring a mutated cache can happen inside it) or None, in
    which case the wall time of the call is used. ``only_every[name] = k`` runs that variant on
    every k-th repeat only (slow variants). Returns {name: {"median_s", "min_s", "n"}}."""
    only_every = only_every or {}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(warmup):
        for name, fn in variants.items():
            if only_every.get(name, 1) == 1:
                fn()
    for i in range(repeats):
        for name, fn in variants.items():
            if i % only_every.get(name, 1):
                continue
            t0 = time.perf_counter()
            dt = fn()
            if dt is None:
                dt = time.perf_counter() - t0
            times[name].append(dt)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "n": len(v)}
            for k, v in times.items() if v}


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write(name: str, payload: dict, markdown: str) -> tuple[str, str]:
    """Writes benchmarks/results/<name>.json and <name>.md; returns the two paths."""
    os.makedirs(RESULTS, exist_ok=True)
    payload["machine"]["loadavg_end"] = loadavg()
    jpath = os.path.join(RESULTS, f"{name}.json")
    mpath = os.path.join(RESULTS, f"{name}.md")
    with open(jpath, "w") as f:
        json.dump(payload, f, indent=1)
    m = payload["machine"]
    head = (f"Machine: {m['nproc']} CPUs, {m['cpu_model']} ({m['cpu_capability']}), torch {m['torch']}, "
            f"{m['torch_threads']} threads; load average (1/5/15 min) at start {m['loadavg_start']}, "
            f"at end {m['loadavg_end']}; {m['time']}.\nCommand: `{m['argv']}`\n\n")
    with open(mpath, "w") as f:
        f.write(head + markdown + "\n")
    return jpath, mpath
