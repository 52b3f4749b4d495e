"""The cost of the engine's transactional snapshot in a SmolLM2-135M decode step (CPU).

    .venv/bin/python benchmarks/bench_snapshot.py [--context N] [--repeats N] [--threads T]

Every ``KVEngine.attend`` call copies the state the ops write in place, so that an exception
leaves the cache as it was. A full cache (``policy="full"``) only appends, so it copies the
statistics and positions but not its keys and values (restore zeroes the slots the call filled);
a budgeted cache compresses every step and copies its ``budget + chunk_size`` slots. After a
chunked prefill of ``--context`` tokens, decode steps with the snapshot (the default) and without
it (``KVEngine.transactional = False``) and with a snapshot that copies every tensor (as before
the append-only snapshot; differs from the default for the full cache only) run interleaved on the
same cache, per budget; the table gives the median step times and their ratios to no snapshot
(1.00 = the snapshot costs nothing).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from weightedkv_ext import WeightedKVCache  # noqa: E402
from weightedkv_ext.engine import KVEngine  # noqa: E402

import _model  # noqa: E402
from _common import fmt_time, interleaved, machine, md_table, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=2048, help="prefill tokens (default 2048)")
    ap.add_argument("--repeats", type=int, default=8, help="interleaved rounds (default 8)")
    ap.add_argument("--budgets", default="256,1024,full")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench_snapshot")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = machine()
    model, tokenizer = _model.load()
    ids = _model.token_ids(tokenizer, args.context, 1)
    rows, results = [], {}
    for name in args.budgets.split(","):
        budget = None if name == "full" else int(name)
        cache = WeightedKVCache(budget, policy="full" if budget is None else "weightedkv")
        tok = _model.prefill(model, ids, cache)

        def run(transactional: bool, copy_all: bool = False):
            def f():
                KVEngine.transactional = transactional
                if copy_all:
                    KVEngine._appends_only = lambda self, window: False
                try:
                    _model.step(model, tok, cache)
                finally:
                    KVEngine.transactional = True
                    KVEngine._appends_only = appends_only
            return f

        appends_only = KVEngine._appends_only
        res = interleaved({"snapshot": run(True), "copy_all": run(True, copy_all=True),
                           "none": run(False)}, args.repeats)
        a, c, b = (res[k]["median_s"] for k in ("snapshot", "copy_all", "none"))
        results[name] = res
        rows.append([name, fmt_time(a), fmt_time(c), fmt_time(b), f"{a / b:.2f}", f"{c / b:.2f}"])
    table = md_table(["budget", "step (snapshot)", "step (copy every tensor)",
                      "step (transactional=False)", "snapshot / none", "copy every / none"],
                     rows)
    print(table)
    paths = write(args.out, {"machine": meta, "context": args.context, "results": results}, table)
    print("\n".join(paths))


if __name__ == "__main__":
    main()
