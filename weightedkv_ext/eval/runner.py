"""Run the cells of an evaluation plan with a progress bar, saving each finished cell."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from .caches import DISPLAY, CacheOptions
from .data import TokenDataset
from .protocol import evaluate, plan_dataset, token_forwards
from .report import ResultStore, cell_key


@dataclass(frozen=True)
class Cell:
    dataset: str
    context: int
    policy: str
    budget: int | None = None
    sinks: int | None = None
    recent: int | None = None

    @property
    def key(self) -> str:
        return cell_key(self.dataset, self.context, self.policy, self.budget, self.sinks, self.recent)

    @property
    def label(self) -> str:
        b = "" if self.policy == "full" else f" b={self.budget}"
        return f"{self.dataset} W={self.context} {DISPLAY[self.policy]}{b}"


def plan(datasets: list[TokenDataset], contexts, policies, budgets, sinks, recent_of) -> list[Cell]:
    """Cells in run order: per dataset and context, full first, then each budget's policies."""
    cells = []
    for ds in datasets:
        for w in contexts:
            if "full" in policies:
                cells.append(Cell(ds.name, w, "full"))
            for b in budgets:
                cells += [Cell(ds.name, w, p, b, sinks, recent_of(b)) for p in policies if p != "full"]
    return cells


def run(model, datasets: list[TokenDataset], cells: list[Cell], store: ResultStore, *,
        batch: int, feed: int, options: CacheOptions, run_record: dict,
        progress: bool = True) -> int:
    """Evaluate the cells missing from ``store`` with caches of ``options``; returns the number
    run. KeyboardInterrupt leaves every finished cell saved and propagates."""
    from tqdm.auto import tqdm  # the eval extra, imported when a run starts

    by_name = {d.name: d for d in datasets}
    todo = [c for c in cells if not store.has(c.key)]
    total = sum(token_forwards(plan_dataset(by_name[c.dataset].doc_tokens, c.context), batch)
                for c in todo)
    tty = sys.stderr.isatty()
    bar = tqdm(total=total, unit="tok", unit_scale=True, dynamic_ncols=True, disable=not progress,
               smoothing=0.1, mininterval=0.5 if tty else 30)
    started = time.perf_counter()
    run_record.update(cells_run=0, seconds=0.0, interrupted=True)
    try:
        for cell in todo:
            bar.set_description(cell.label)
            make = options.factory(cell.policy, cell.budget, cell.sinks or 0, cell.recent)
            ds = by_name[cell.dataset]
            t0 = time.perf_counter()
            tot = evaluate(model, ds.docs, cell.context, make, batch=batch, feed=feed,
                           on_tokens=bar.update)
            sec = time.perf_counter() - t0
            run_record.update(cells_run=run_record["cells_run"] + 1,
                              seconds=round(time.perf_counter() - started, 3))
            store.add(cell.key, {
                "dataset": cell.dataset, "context": cell.context, "policy": cell.policy,
                "budget": cell.budget, "sinks": cell.sinks, "recent": cell.recent,
                "nll_sum": tot.nll_sum, "tokens": tot.tokens, "forwards": tot.forwards,
                "seconds": round(sec, 3), "forwards_per_s": round(tot.forwards / sec, 2),
                "tokens_per_s": round(tot.tokens / sec, 2), "batch": batch,
            })
        run_record.update(interrupted=False)
    finally:
        bar.close()
        run_record.update(seconds=round(time.perf_counter() - started, 3))
    return run_record["cells_run"]
