"""Running the ``passkey`` / ``niah`` / ``kl`` tasks: plans, batched model runs, resumable results.

Retrieval: every prompt of a cell has exactly ``length`` tokens (tasks.py), so samples of all
depths are batched without padding. A prompt is processed as a user's would be: prefill through
the cache ``feed`` tokens per model call (the cache compresses every ``chunk_size`` tokens, i.e.
during the prompt), then greedy decoding of ``max_new_tokens`` tokens, one per call. The full cache
runs first at each length; compressed policies run only where it reaches ``min_full`` accuracy.

KL: each document's first ``length`` tokens; the full cache and every policy see the same tokens,
fed in lockstep, and each position's KL(p_full || p_policy) (nats) and top-1 agreement are
averaged per document.

Results go to ``<out>/results_<task>.json`` after every batch (rerun the same command to resume).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .caches import DISPLAY, POLICIES, prompt_display
from .tasks import exact_match, sample_key, split_sample_key

FORMAT = "weightedkv_ext.eval.tasks/1"


class ResumeError(ValueError):
    """``--out`` holds results of another configuration."""


@dataclass(frozen=True)
class Cell:
    task: str
    dataset: str  # haystack / text dataset name ("filler" for passkey)
    length: int
    policy: str
    budget: int | None = None
    sinks: int | None = None
    recent: int | None = None
    prompt: str = "stream"  # caches.prompt_name: a PROMPT_VARIANTS key (+ "_p<pool>")

    @property
    def key(self) -> str:
        head = f"{self.task}/{self.dataset}/len{self.length}"
        if self.policy == "full":
            return f"{head}/full"
        tail = "" if self.prompt == "stream" else f"/{self.prompt}"
        return f"{head}/{self.policy}/b{self.budget}/s{self.sinks}/r{self.recent}{tail}"

    @property
    def label(self) -> str:
        b = "" if self.policy == "full" else f" b={self.budget}"
        return (f"{self.task} {self.dataset} L={self.length} {DISPLAY[self.policy]}"
                f"{prompt_display(self.prompt) if self.policy != 'full' else ''}{b}")

    def record(self) -> dict:
        return {"task": self.task, "dataset": self.dataset, "length": self.length,
                "policy": self.policy, "budget": self.budget, "sinks": self.sinks,
                "recent": self.recent, "prompt_mode": self.prompt}


def plan(task: str, datasets: list[str], lengths, policies, budgets, sinks, recent_of,
         prompts=("stream",)) -> list[Cell]:
    """Cells in run order: per dataset and length, the full cache first, then each budget and
    prompt mode."""
    cells = []
    for ds in datasets:
        for length in lengths:
            if "full" in policies:
                cells.append(Cell(task, ds, length, "full"))
            for b in budgets:
                for pm in prompts:
                    cells += [Cell(task, ds, length, p, b, sinks, recent_of(b), pm)
                              for p in policies if p != "full"]
    return cells


def _same_docs(a: dict, b: dict) -> bool:
    """Two dataset descriptions agree on the documents both hold (names in the same order)."""
    n = min(len(a["docs"]), len(b["docs"]))
    return a["docs"][:n] == b["docs"][:n] and a["doc_tokens"][:n] == b["doc_tokens"][:n]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class TaskStore:
    """``<out>/results_<task>.json``: configuration, cells (partial ones too), runs."""

    def __init__(self, out, task: str, config: dict, environment: dict, on_save=None):
        self.dir = Path(out)
        self.task = task
        self.path = self.dir / f"results_{task}.json"
        self.on_save = on_save  # called with the data after each save (Markdown, plots)
        if self.path.exists():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
            if self.data.get("format") != FORMAT:
                raise ResumeError(f"argument --out: {str(self.path)!r} is not a task results file "
                                  f"of this harness (format {self.data.get('format')!r})")
            for k, v in config.items():
                if k == "datasets":  # documents may be added; the same name must hold the same tokens
                    for name, desc in v.items():
                        old = self.data["config"].setdefault(k, {}).get(name)
                        if old is not None and not _same_docs(old, desc):
                            raise ResumeError(
                                f"argument --out: {str(self.dir)!r} holds {task} results for "
                                f"another dataset {name!r} (documents or tokens differ); use "
                                "another --out folder")
                        self.data["config"][k][name] = desc if old is None or len(
                            desc["docs"]) >= len(old["docs"]) else old
                    continue
                have = self.data["config"].get(k)
                if have != v:
                    raise ResumeError(
                        f"argument --out: {str(self.dir)!r} holds {task} results for {k}={have!r}, "
                        f"this run has {k}={v!r}; use another --out folder (or the same {k}) "
                        "to resume")
        else:
            self.data = {"format": FORMAT, "task": task, "config": config,
                         "environment": environment, "runs": [], "cells": {}}

    @property
    def cells(self) -> dict:
        return self.data["cells"]

    def cell(self, cell: Cell) -> dict:
        c = self.cells.get(cell.key)
        if c is None:
            c = self.cells[cell.key] = {**cell.record(), "results": {}, "seconds": 0.0}
        return c

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path, json.dumps(self.data, indent=1) + "\n")
        if self.on_save is not None:
            self.on_save(self.data)


def merge_results(sources: list[tuple[str, dict]]) -> dict:
    """The union of task results files (``(name, data)`` pairs, e.g. folders run in parallel as
    lanes of one experiment): one task and one configuration (documents may differ, as when
    resuming); cells by key, each the union of its samples (retrieval) or documents (kl), the
    first source winning a sample two hold; seconds of the samples a source adds; a cell is
    complete when any source completed it; runs in source order; the first source's environment.
    Raises ValueError naming the sources and the key that differ."""
    if not sources:
        raise ValueError("taskreport --merge: no results to merge")
    name0, first = sources[0]
    merged = dict(first, config=json.loads(json.dumps(first["config"])), cells={}, runs=[])
    for name, data in sources:
        for key in ("format", "task"):
            if data.get(key) != first.get(key):
                raise ValueError(f"taskreport --merge: {name} holds {key}={data.get(key)!r}, "
                                 f"{name0} holds {key}={first.get(key)!r}; merge results of one "
                                 "task only")
        config = merged["config"]
        for k in sorted(set(config) | set(data["config"])):
            have, v = config.get(k), data["config"].get(k)
            if k == "datasets":
                for ds, desc in (v or {}).items():
                    old = config.setdefault(k, {}).get(ds)
                    if old is not None and not _same_docs(old, desc):
                        raise ValueError(f"taskreport --merge: {name} and {name0} hold dataset "
                                         f"{ds!r} with other documents or tokens")
                    if old is None or len(desc["docs"]) > len(old["docs"]):
                        config[k][ds] = desc
            elif have != v:
                raise ValueError(f"taskreport --merge: {name} holds {k}={v!r}, {name0} holds "
                                 f"{k}={have!r}; only results of one configuration can be merged")
        merged["runs"] += data.get("runs", [])
        for key, cell in data["cells"].items():
            old = merged["cells"].get(key)
            if old is None:
                merged["cells"][key] = json.loads(json.dumps(cell))
                continue
            extra = {r: v for r, v in cell["results"].items() if r not in old["results"]}
            if extra:
                old["results"].update(json.loads(json.dumps(extra)))
                share = len(extra) / len(cell["results"])
                old["seconds"] = round(old["seconds"] + cell["seconds"] * share, 3)
            old["complete"] = bool(old.get("complete") or cell.get("complete"))
            if not cell.get("skipped"):
                old.pop("skipped", None)
    return merged


def balance(data: dict) -> dict[str, int]:
    """Keep in each retrieval cell of ``data`` (in place) only the prompt indices stored at every
    depth the cell holds, so that a top-up interrupted part-way (prompts run depth by depth) does
    not skew the cell's depth mix; its seconds shrink in proportion. Returns {cell key: prompts
    dropped} for the cells it changed; ``kl`` results (keyed by document) are left as they are."""
    dropped = {}
    if data.get("task") == "kl":
        return dropped
    for key, cell in data["cells"].items():
        by_depth: dict[float, set[int]] = {}
        for sample in cell["results"]:
            depth, index = split_sample_key(sample)
            by_depth.setdefault(depth, set()).add(index)
        if not by_depth:
            continue
        keep = set.intersection(*by_depth.values())
        kept = {s: r for s, r in cell["results"].items() if split_sample_key(s)[1] in keep}
        if len(kept) < len(cell["results"]):
            dropped[key] = len(cell["results"]) - len(kept)
            cell["seconds"] = round(cell["seconds"] * len(kept) / len(cell["results"]), 3)
            cell["results"] = kept
    return dropped


# -- retrieval ---------------------------------------------------------------------------------


def accuracy(cell: dict) -> tuple[int, int]:
    """(correct, answered) over the stored samples of a retrieval cell."""
    res = cell["results"].values()
    return sum(1 for r in res if r["ok"]), len(res)


def shared_prefix(ids: torch.Tensor, multiple: int) -> int:
    """Length of the prefix common to all rows of ``ids`` [B, L], rounded down to a multiple of
    ``multiple`` and leaving at least one token per row."""
    same = (ids == ids[:1]).all(0).long()
    n = int(same.cumprod(0).sum())
    return min(n, ids.shape[1] - 1) // multiple * multiple


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, cache, feed: int, new_tokens: int,
           chunk_size: int = 1) -> torch.Tensor:
    """Prefill ``ids`` through ``cache``, end its prompt, decode greedily (``prefill`` then
    ``decode``); returns the new tokens, int64 [B, new_tokens]."""
    logits = prefill(model, ids, cache, feed, chunk_size)
    return decode(model, logits, cache, new_tokens)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, cache, feed: int, chunk_size: int = 1) -> torch.Tensor:
    """Prefill ``ids`` [B, L] through ``cache`` ``feed`` tokens per call; returns the logits of
    the last call (float [B, 1, V]). The prompt is not ended (``decode`` does that).

    A prefix common to all rows (e.g. the passkey filler before the needle) is run once, for one
    row, and the cache is then repeated over the batch (``Cache.batch_repeat_interleave``): the
    same computation per row, as chunk boundaries stay at multiples of ``chunk_size`` (``feed`` is
    one too); only float rounding of the differently shaped calls can differ.
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    B, L = ids.shape
    start = shared_prefix(ids, chunk_size) if B > 1 else 0
    logits = None
    if start:
        for s in range(0, start, feed):
            model(input_ids=ids[:1, s:min(s + feed, start)], **cache.as_kwargs(), use_cache=True,
                  logits_to_keep=1)
        cache.batch_repeat_interleave(B)
    for s in range(start, L, feed):
        logits = model(input_ids=ids[:, s:s + feed], **cache.as_kwargs(), use_cache=True,
                       logits_to_keep=1).logits
    return logits


@torch.inference_mode()
def decode(model, logits: torch.Tensor, cache, new_tokens: int) -> torch.Tensor:
    """End the prompt of ``cache`` (snapkv prompt mode: compress it once; a no-op when
    streaming), then greedy-decode ``new_tokens`` tokens from the prefill's ``logits``."""
    if hasattr(cache, "end_prompt"):
        cache.end_prompt()
    out = [logits[:, -1].argmax(-1)]
    for _ in range(new_tokens - 1):
        logits = model(input_ids=out[-1][:, None], **cache.as_kwargs(), use_cache=True,
                       logits_to_keep=1).logits
        out.append(logits[:, -1].argmax(-1))
    return torch.stack(out, 1).cpu()


def full_gate(store: TaskStore, cell: Cell, min_full: float) -> tuple[bool, float | None]:
    """(may run, full-cache accuracy): a compressed cell runs only where the complete full-cache
    cell of its length reached ``min_full``."""
    full = store.cells.get(Cell(cell.task, cell.dataset, cell.length, "full").key)
    if full is None or not full.get("complete"):
        return False, None
    ok, n = accuracy(full)
    acc = ok / n if n else 0.0
    return acc >= min_full, acc


def fork(src, make):
    """A fresh cache ``make()`` holding a copy of ``src``'s prompt. ``src`` must be a snapkv
    prompt-mode cache whose prompt is still held uncompressed (no prompt_budget): its state is then
    exactly the full cache's, so the copy continues as ``make()``'s policy and prompt mode would
    have after the same prefill (the full cache included)."""
    from ..cache import WeightedKVLayer
    from ..engine import KVEngine

    dst = make()
    for layer in src.layers:
        new = WeightedKVLayer(dst, layer.layer_idx)
        new.seen = layer.seen
        new.columns = None if layer.columns is None else layer.columns.clone()
        e, s = new.engine, layer.engine
        for n in KVEngine._TENSORS:
            setattr(e, n, getattr(s, n).clone())
        e.seen, e.peak_block, e.window = s.seen, s.peak_block, s.window
        e._window_fixed, e._prompt = s._window_fixed, s._prompt
        dst.layers.append(new)
    return dst


def _result(tokenizer, tokens: list[int], answer: str) -> dict:
    """One sample's stored record: the decoded continuation and its exact-match verdict."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return {"ok": exact_match(text, answer), "answer": answer, "output": text}


def _shares_prefill(cell: Cell) -> bool:
    return cell.policy == "full" or cell.prompt != "stream"


def run_retrieval(model, tokenizer, generator, cells: list[Cell], store: TaskStore, make_cache, *,
                  depths, samples: int, batch: int, feed: int, min_full: float, chunk_size: int = 1,
                  progress: bool = True, run_record: dict) -> None:
    """Evaluate the missing samples of ``cells`` (generator: a tasks.PasskeyTask / NiahTask).

    Cells in a snapkv prompt mode hold the prompt uncompressed until its end, so their prefill is
    the full cache's: per (dataset, length) the full cell and every snapkv cell share one prefill
    per batch (``fork``), then each ends its prompt and decodes on its own. They run together,
    so the full-cache gate does not apply to them (the report still marks lengths where the
    full cache is below ``min_full``)."""
    from tqdm.auto import tqdm

    wanted = [(float(d), i) for d in depths for i in range(samples)]

    def pending(cell):
        have = store.cells.get(cell.key, {}).get("results", {})
        return [(d, i) for d, i in wanted if sample_key(d, i) not in have]

    if any(c.prompt != "stream" and c.policy != "full" for c in cells):
        shared = [c for c in cells if _shares_prefill(c)]
        for col in dict.fromkeys((c.dataset, c.length) for c in shared):
            group = [c for c in shared if (c.dataset, c.length) == col]
            if any(c.policy != "full" for c in group):
                _run_shared(model, tokenizer, generator, group, store, make_cache, pending,
                            batch=batch, feed=feed, chunk_size=chunk_size, progress=progress,
                            run_record=run_record)
        cells = [c for c in cells if not _shares_prefill(c)]

    total = sum(len(pending(c)) for c in cells)
    bar = tqdm(total=total, unit="prompt", dynamic_ncols=True, disable=not progress,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    new_tokens = generator.max_new_tokens
    started = time.perf_counter()
    run_record.setdefault("samples_run", 0)
    run_record["interrupted"] = True
    try:
        for cell in cells:
            todo = pending(cell)
            if cell.policy != "full":
                ok, acc = full_gate(store, cell, min_full)
                if not ok:
                    if cell.key in store.cells:
                        store.cells[cell.key]["skipped"] = True
                    bar.update(len(todo))
                    continue
            rec = store.cell(cell)
            rec.pop("skipped", None)
            bar.set_description(cell.label)
            for b in range(0, len(todo), batch):
                group = todo[b:b + batch]
                prompts = [generator.sample(cell.length, d, i) for d, i in group]
                ids = torch.tensor([p.ids for p in prompts], dtype=torch.long)
                t0 = time.perf_counter()
                gen = greedy(model, ids, make_cache(cell), feed, new_tokens, chunk_size)
                rec["seconds"] = round(rec["seconds"] + time.perf_counter() - t0, 3)
                for (d, i), p, g in zip(group, prompts, gen.tolist()):
                    rec["results"][sample_key(d, i)] = _result(tokenizer, g, p.answer)
                rec["complete"] = len(pending(cell)) == 0
                run_record["samples_run"] += len(group)
                run_record["seconds"] = round(time.perf_counter() - started, 3)
                store.save()
                bar.update(len(group))
            if not todo and not rec.get("complete"):
                rec["complete"] = True
                store.save()
        run_record["interrupted"] = False
    finally:
        bar.close()
        run_record["seconds"] = round(time.perf_counter() - started, 3)


def _run_shared(model, tokenizer, generator, group, store, make_cache, pending, *, batch, feed,
                chunk_size, progress, run_record) -> None:
    """One prefill per batch of samples (a snapkv carrier), forked into every cell of ``group``."""
    from tqdm.auto import tqdm

    carrier_cell = next(c for c in group if c.policy != "full")
    todo = list(dict.fromkeys(s for c in group for s in pending(c)))
    bar = tqdm(total=len(todo), unit="prompt", dynamic_ncols=True, disable=not progress,
               mininterval=0.5 if sys.stderr.isatty() else 30,
               desc=f"{carrier_cell.task} L={carrier_cell.length} shared prefill x{len(group)}")
    started = time.perf_counter()
    run_record.setdefault("samples_run", 0)
    for b in range(0, len(todo), batch):
        part = todo[b:b + batch]
        prompts = [generator.sample(group[0].length, d, i) for d, i in part]
        ids = torch.tensor([p.ids for p in prompts], dtype=torch.long)
        t0 = time.perf_counter()
        carrier = make_cache(carrier_cell)
        logits = prefill(model, ids, carrier, feed, chunk_size)
        share = (time.perf_counter() - t0) / len(group)
        for cell in group:
            missing = set(pending(cell))
            if not missing.intersection(part):
                continue
            t1 = time.perf_counter()
            gen = decode(model, logits, fork(carrier, lambda: make_cache(cell)),
                         generator.max_new_tokens)
            rec = store.cell(cell)
            rec["prefill"] = "shared"
            rec["seconds"] = round(rec["seconds"] + share + time.perf_counter() - t1, 3)
            for (d, i), p, g in zip(part, prompts, gen.tolist()):
                if (d, i) in missing:
                    rec["results"][sample_key(d, i)] = _result(tokenizer, g, p.answer)
            rec["complete"] = len(pending(cell)) == 0
        run_record["samples_run"] += len(part)
        run_record["seconds"] = round(run_record.get("seconds", 0.0)
                                      + time.perf_counter() - started, 3)
        started = time.perf_counter()
        store.save()
        bar.update(len(part))
    bar.close()


# -- KL ----------------------------------------------------------------------------------------


def kl_terms(logits_full: torch.Tensor, logits_policy: torch.Tensor):
    """Per position: KL(p_full || p_policy) in nats and top-1 agreement, from [..., V] logits."""
    lp = F.log_softmax(logits_full.float(), -1)
    lq = F.log_softmax(logits_policy.float(), -1)
    kl = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    agree = logits_full.argmax(-1) == logits_policy.argmax(-1)
    return kl.double(), agree


@torch.inference_mode()
def run_kl(model, dataset, cells: list[Cell], store: TaskStore, make_cache, full_cache, *,
           length: int, batch: int, feed: int, progress: bool = True, run_record: dict,
           merge_stats: bool = False) -> None:
    """KL cells of one (dataset, length): documents in batches, full and policies in lockstep.

    ``dataset``: data.TokenDataset; documents shorter than ``length`` tokens are skipped (listed
    in the config). ``full_cache()`` makes the reference full cache. Each document's result also
    holds ``nll`` / ``nll_full`` (summed next-token NLL of the policy / the full cache over the
    ``targets = length - 1`` predictions: perplexity = exp(nll / targets)) and, with
    ``merge_stats``, ``merge_max`` / ``merge_hist`` (``WeightedKVCache.merge_stats`` at the end,
    max and histogram over layers and KV heads).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    docs = [(n, d[:length]) for n, d in zip(dataset.doc_names, dataset.docs) if len(d) >= length]

    def pending(cell):
        have = store.cells.get(cell.key, {}).get("results", {})
        return [n for n, _ in docs if n not in have]

    todo_docs = [(n, d) for n, d in docs if any(n in pending(c) for c in cells)]
    bar = tqdm(total=len(todo_docs) * length * (1 + len(cells)), unit="tok", unit_scale=True,
               dynamic_ncols=True, disable=not progress,
               mininterval=0.5 if sys.stderr.isatty() else 30,
               desc=f"kl {dataset.name} L={length}")
    started = time.perf_counter()
    try:
        for b in range(0, len(todo_docs), batch):
            group = todo_docs[b:b + batch]
            names = [n for n, _ in group]
            ids = torch.stack([d for _, d in group]).to(device)
            run = [c for c in cells if any(n in pending(c) for n in names)]
            caches = {c.key: make_cache(c) for c in run}
            ref = full_cache()
            sums = {c.key: torch.zeros(len(group), dtype=torch.float64) for c in run}
            agree = {c.key: torch.zeros(len(group), dtype=torch.int64) for c in run}
            secs = {c.key: 0.0 for c in run}
            nll = {c.key: torch.zeros(len(group), dtype=torch.float64) for c in run}
            nll_full = torch.zeros(len(group), dtype=torch.float64)

            def nll_of(logits, s):  # next-token NLL summed per row (targets inside the document)
                tgt = ids[:, s + 1:s + 1 + logits.shape[1]]
                lg = logits[:, :tgt.shape[1]].float()
                return F.cross_entropy(lg.transpose(1, 2), tgt, reduction="none").sum(1).double()

            for s in range(0, length, feed):
                chunk = ids[:, s:s + feed]
                ref_logits = model(input_ids=chunk, **ref.as_kwargs(), use_cache=True).logits
                nll_full += nll_of(ref_logits, s).cpu()
                bar.update(chunk.numel())
                for c in run:
                    t0 = time.perf_counter()
                    logits = model(input_ids=chunk, **caches[c.key].as_kwargs(),
                                   use_cache=True).logits
                    kl, ag = kl_terms(ref_logits, logits)
                    sums[c.key] += kl.sum(1).cpu()
                    agree[c.key] += ag.sum(1).cpu()
                    nll[c.key] += nll_of(logits, s).cpu()
                    secs[c.key] += time.perf_counter() - t0
                    del logits
                    bar.update(chunk.numel())
                del ref_logits
            for c in run:
                rec = store.cell(c)
                stats = caches[c.key].merge_stats() if merge_stats else None
                for r, n in enumerate(names):
                    rec["results"][n] = {"kl": float(sums[c.key][r] / length),
                                         "agree": int(agree[c.key][r]) / length,
                                         "positions": length, "nll": float(nll[c.key][r]),
                                         "nll_full": float(nll_full[r]), "targets": length - 1}
                    if stats is not None and stats["max"].numel():
                        rec["results"][n]["merge_max"] = int(stats["max"][:, r].max())
                        rec["results"][n]["merge_hist"] = stats["hist"][:, r].sum((0, 1)).tolist()
                rec["seconds"] = round(rec["seconds"] + secs[c.key], 3)
                rec["complete"] = not pending(c)
            run_record["seconds"] = round(run_record.get("seconds", 0.0)
                                          + time.perf_counter() - started, 3)
            started = time.perf_counter()
            store.save()
        for c in cells:
            if c.key in store.cells and not pending(c):
                store.cells[c.key]["complete"] = True
        store.save()
    finally:
        bar.close()


def policies_in_order(names) -> list[str]:
    return [p for p in POLICIES if p in set(names)]
