"""Results on disk: ``results.json`` (written after every finished cell, so a rerun resumes) and
the Markdown table shaped like the paper's Table I (``results.md``)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..policies import is_default_group
from .caches import DISPLAY, POLICIES, default_recent

FORMAT = "weightedkv_ext.eval/1"
JSON_NAME, MD_NAME, PNG_NAME = "results.json", "results.md", "ppl_vs_budget.png"


# Configuration keys added after the first results files were written, with the value those
# files implicitly used: a file without the key resumes only with that value.
CONFIG_DEFAULTS = {"group_reduce": "mean"}


class ResumeError(ValueError):
    """``--out`` holds results of another configuration."""


def cell_key(dataset: str, context: int, policy: str, budget: int | None, sinks: int,
             recent: int | None) -> str:
    if policy == "full":
        return f"{dataset}/ctx{context}/full"
    return f"{dataset}/ctx{context}/{policy}/b{budget}/s{sinks}/r{recent}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ResultStore:
    """The results of one ``--out`` folder: configuration, finished cells, runs."""

    def __init__(self, out: str | Path, config: dict, environment: dict):
        self.dir = Path(out)
        self.path = self.dir / JSON_NAME
        if self.path.exists():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
            self._check_resume(config)
        else:
            self.data = {"format": FORMAT, "config": config, "environment": environment,
                         "runs": [], "cells": {}}

    def _check_resume(self, config: dict) -> None:
        old = self.data.get("config", {})
        if self.data.get("format") != FORMAT:
            raise ResumeError(f"argument --out: {str(self.path)!r} is not a results file of this "
                              f"harness (format {self.data.get('format')!r})")
        for k, v in config.items():
            if k == "datasets":
                continue
            have = old.get(k, CONFIG_DEFAULTS.get(k))
            if have != v:
                raise ResumeError(
                    f"argument --out: {str(self.dir)!r} holds results for {k}={have!r}, this run "
                    f"has {k}={v!r}; use another --out folder (or the same {k}) to resume")
        for name, desc in config["datasets"].items():
            have = old["datasets"].get(name)
            if have is not None and have != desc:
                raise ResumeError(
                    f"argument --out: {str(self.dir)!r} holds results for a different dataset "
                    f"{name!r} (documents or tokens differ: docs={have['docs']}, "
                    f"doc_tokens={have['doc_tokens']}); use another --out folder")
            old["datasets"].setdefault(name, desc)

    @property
    def cells(self) -> dict:
        return self.data["cells"]

    def has(self, key: str) -> bool:
        return key in self.cells

    def start_run(self, run: dict) -> None:
        self.data["runs"].append(run)

    def add(self, key: str, record: dict) -> None:
        self.cells[key] = record
        self.save()

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        order = sorted(self.cells, key=lambda k: _sort_key(self.data, self.cells[k]))
        self.data["cells"] = {k: self.cells[k] for k in order}
        _atomic_write(self.path, json.dumps(self.data, indent=1) + "\n")
        _atomic_write(self.dir / MD_NAME, markdown(self.data) + "\n")


def _sort_key(data: dict, c: dict):
    datasets = list(data["config"]["datasets"])
    group = (0, 0, 0, 0) if c["policy"] == "full" else (1, c["budget"], c["sinks"], c["recent"])
    return (datasets.index(c["dataset"]), c["context"], group, POLICIES.index(c["policy"]))


def ppl(cell: dict) -> float:
    return math.exp(cell["nll_sum"] / cell["tokens"])


def _ctx_label(context: int) -> str:
    return f"{context // 1024}k" if context % 1024 == 0 else str(context)


def columns(data: dict) -> list[tuple[str, int]]:
    cells = data["cells"].values()
    return sorted({(c["dataset"], c["context"]) for c in cells},
                  key=lambda dc: (list(data["config"]["datasets"]).index(dc[0]), dc[1]))


def row_groups(data: dict) -> list[tuple[tuple | None, list[str]]]:
    """``[(None, ["full"]), ((budget, sinks, recent), [policies...]), ...]`` in table order."""
    cells = list(data["cells"].values())
    groups: list = []
    if any(c["policy"] == "full" for c in cells):
        groups.append((None, ["full"]))
    for g in sorted({(c["budget"], c["sinks"], c["recent"]) for c in cells if c["policy"] != "full"}):
        pols = {c["policy"] for c in cells if (c["budget"], c["sinks"], c["recent"]) == g}
        groups.append((g, [p for p in POLICIES if p in pols]))
    return groups


def find(data: dict, dataset: str, context: int, policy: str, group: tuple | None) -> dict | None:
    budget, sinks, recent = group if group else (None, None, None)
    return data["cells"].get(cell_key(dataset, context, policy, budget, sinks, recent))


def _budget_label(group: tuple | None) -> str:
    if group is None:
        return "-"
    budget, sinks, recent = group
    if is_default_group(budget, sinks, recent):
        return str(budget)
    return f"{budget} (sinks {sinks}, recent {recent})"


def chunk_note(chunk_size: int) -> str:
    if chunk_size == 1:
        return "chunk size 1 (paper setting: tokens fed and compressed one by one)"
    return (f"chunk size {chunk_size} (NOT the paper setting: the cache is compressed once every "
            f"{chunk_size} tokens, so it briefly holds up to budget + {chunk_size} tokens)")


def markdown(data: dict) -> str:
    """Table I layout: rows = policies grouped by budget (full cache on top), columns = dataset x
    context; the best compressed policy of each budget and column in bold."""
    cfg = data["config"]
    cols = columns(data)
    lines = [
        f"Perplexity, sliding window W with stride W/2 (each window from an empty cache), "
        f"model `{cfg['model']}` ({cfg['dtype']}), {chunk_note(cfg['chunk_size'])}.",
        "",
        "| Budget | Policy | " + " | ".join(f"{d} {_ctx_label(w)}" for d, w in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for group, policies in row_groups(data):
        found = {(p, col): find(data, *col, p, group) for p in policies for col in cols}
        best = {}
        for col in cols:
            vals = [ppl(found[p, col]) for p in policies if p != "full" and found[p, col]]
            best[col] = min(vals) if len(vals) > 1 else None
        for i, p in enumerate(policies):
            cells = []
            for col in cols:
                c = found[p, col]
                if c is None:
                    cells.append("")
                    continue
                v = ppl(c)
                cells.append(f"**{v:.2f}**" if best[col] is not None and v == best[col] else f"{v:.2f}")
            label = _budget_label(group) if i == 0 else ""
            lines.append(f"| {label} | {DISPLAY[p]} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, desc in cfg["datasets"].items():
        if any(d == name for d, _ in cols):
            toks = desc["doc_tokens"]
            lines.append(f"- `{name}`: {len(toks)} document(s) ({', '.join(desc['docs'])}), "
                         f"{sum(toks)} tokens ({' + '.join(map(str, toks))}); each cell counts "
                         f"{desc['targets']} predicted tokens.")
    reduce = cfg.get("group_reduce", "mean")
    if reduce != "mean":
        lines.append(f"- GQA: the scores of the query heads sharing a KV head are combined with "
                     f"`group_reduce={reduce}` (NOT the default `mean`).")
    secs = sum(c["seconds"] for c in data["cells"].values())
    fwd = sum(c["forwards"] for c in data["cells"].values())
    lines.append("- Budget: KV tokens held per layer and KV head, 4 attention sinks and "
                 "budget/2 - 4 recent tokens among them unless the budget column says otherwise.")
    lines.append(f"- {len(data['cells'])} cells, {fwd} token forwards in {secs:.0f} s of evaluation "
                 f"({fwd / max(secs, 1e-9):.0f} token forwards/s).")
    return "\n".join(lines)
