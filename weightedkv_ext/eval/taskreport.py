"""Markdown tables and PNG plots of the ``passkey`` / ``niah`` / ``kl`` results.

Retrieval: accuracy with its 95% Wilson interval per (policy, budget, length), the full cache on
top; a compressed cell at a length where the full cache is below ``min_full_accuracy`` is not
compared. Plots: one heatmap per policy (depth x length, one panel per budget) and accuracy vs
budget (one panel per length). KL: mean KL(p_full || p_policy) per token and top-1 agreement per
(policy, budget, dataset x length); plot: KL vs budget.
"""
from __future__ import annotations

from pathlib import Path

from .caches import DISPLAY, POLICIES, default_recent, prompt_display, prompt_order
from .tasks import split_sample_key, wilson


def unanimous(cells: list[dict]) -> tuple[int, int]:
    """(groups whose verdicts all agree, groups): the prompts of each retrieval cell grouped by
    depth, groups of one prompt left out."""
    agree = groups = 0
    for c in cells:
        by_depth: dict[float, list[bool]] = {}
        for sample, r in c["results"].items():
            by_depth.setdefault(split_sample_key(sample)[0], []).append(r["ok"])
        for oks in by_depth.values():
            if len(oks) > 1:
                groups += 1
                agree += len(set(oks)) == 1
    return agree, groups


def md_name(task: str) -> str:
    return f"results_{task}.md"


def _cells(data: dict) -> list[dict]:
    return list(data["cells"].values())


def _len_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _groups(cells: list[dict]) -> list:
    gs = sorted({(c["budget"], c["sinks"], c["recent"]) for c in cells if c["policy"] != "full"})
    return ([None] if any(c["policy"] == "full" for c in cells) else []) + gs


def _group_of(c: dict):
    return None if c["policy"] == "full" else (c["budget"], c["sinks"], c["recent"])


def _budget_label(group, groups=()) -> str:
    """The budget alone when every compressed group of the table has the same sinks and the
    default recent window; else budget, sinks and recent."""
    if group is None:
        return "-"
    budget, sinks, recent = group
    plain = all(g is None or (g[1] == sinks and g[2] == default_recent(g[0], g[1]))
                for g in [group, *groups])
    return str(budget) if plain else f"{budget} (sinks {sinks}, recent {recent})"


def _columns(cells: list[dict]) -> list[tuple[str, int]]:
    return sorted({(c["dataset"], c["length"]) for c in cells}, key=lambda x: (x[0], x[1]))


def _prompt_of(c: dict) -> str:
    return c.get("prompt_mode") or "stream"


def _find(cells, dataset, length, policy, group, prompt="stream"):
    for c in cells:
        if (c["dataset"], c["length"], c["policy"], _group_of(c)) == (dataset, length, policy, group) \
                and (policy == "full" or _prompt_of(c) == prompt):
            return c
    return None


def _variants(cells, group=False) -> list[tuple[str, str]]:
    """(policy, prompt mode) rows present (in ``group`` unless False), table order: each policy
    with its prompt modes next to each other."""
    modes = sorted({_prompt_of(c) for c in cells} | {"stream"}, key=prompt_order)
    return [(p, m) for p in POLICIES for m in modes
            if any(c["policy"] == p and (p != "full" or m == "stream") and
                   (p == "full" or _prompt_of(c) == m) and
                   (group is False or _group_of(c) == group) for c in cells)]


def _display(policy: str, prompt: str) -> str:
    return DISPLAY[policy] + (prompt_display(prompt) if policy != "full" else "")


# -- retrieval ---------------------------------------------------------------------------------


def counts(cell: dict, depth: float | None = None) -> tuple[int, int]:
    res = [r for k, r in cell["results"].items()
           if depth is None or split_sample_key(k)[0] == depth]
    return sum(1 for r in res if r["ok"]), len(res)


def depths_of(cells: list[dict]) -> list[float]:
    return sorted({split_sample_key(k)[0] for c in cells for k in c["results"]})


def full_accuracy(cells, dataset, length) -> float | None:
    full = _find(cells, dataset, length, "full", None)
    if full is None or not full.get("complete"):
        return None
    ok, n = counts(full)
    return ok / n if n else None


def _acc_cell(ok: int, n: int) -> str:
    if n == 0:
        return ""
    lo, hi = wilson(ok, n)
    return f"{100 * ok / n:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] (n={n})"


def retrieval_markdown(data: dict) -> str:
    cfg, cells = data["config"], _cells(data)
    min_full = cfg.get("min_full_accuracy", 0.8)
    cols = _columns(cells)
    lines = [f"Task `{data['task']}`: exact-match accuracy, 95% Wilson interval, n prompts "
             f"(all depths together). Model `{cfg['model']}` ({cfg['dtype']}), chunk size "
             f"{cfg['chunk_size']}, greedy, {cfg.get('max_new_tokens')} new tokens.", "",
             "| Budget | Policy | " + " | ".join(f"{d} {_len_label(n)}" for d, n in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    not_compared = set()
    groups = _groups(cells)
    for group in groups:
        for i, (p, pm) in enumerate(_variants(cells, group)):
            row = []
            for col in cols:
                c = _find(cells, *col, p, group, pm)
                if c is None:
                    fa = full_accuracy(cells, *col)
                    if p != "full" and fa is not None and fa < min_full:
                        not_compared.add(col)
                        row.append("n/c")
                    else:
                        row.append("")
                    continue
                row.append(_acc_cell(*counts(c)))
            lines.append(f"| {_budget_label(group, groups) if i == 0 else ''} | {_display(p, pm)} | "
                         + " | ".join(row) + " |")
    lines.append("")
    for d, n in cols:
        fa = full_accuracy(cells, d, n)
        if fa is not None and fa < min_full:
            lines.append(f"- {d} {_len_label(n)}: the full cache itself reaches only {100 * fa:.0f}% "
                         f"(< {100 * min_full:.0f}%): the model cannot do the task at this length, "
                         "so compressed policies are not compared there (n/c).")
    depths = depths_of(cells)
    lines.append(f"- Depths (percent of the context): {', '.join(f'{d:g}' for d in depths)}; "
                 "per-depth accuracy in the heatmaps and the JSON file.")
    secs = sum(c["seconds"] for c in cells)
    prompts = sum(len(c["results"]) for c in cells)
    lines.append(f"- {prompts} prompts in {secs:.0f} s of model time.")
    agree, n_groups = unanimous(cells)
    if n_groups:
        lines.append(f"- In {agree} of the {n_groups} (cell, depth) groups of two or more prompts all "
                     "verdicts agree: where a needle sits decides more than which prompt it is, "
                     "so a cell is closer to one trial per depth than to n independent ones and "
                     "its Wilson interval (computed for n) is too narrow.")
    lines += ["", "Per depth (correct / n):", "",
              "| Budget | Policy | Length | " + " | ".join(f"{d:g}%" for d in depths) + " |",
              "|---|---|---|" + "---:|" * len(depths)]
    for group in groups:
        for p, pm in _variants(cells, group):
            for col in cols:
                c = _find(cells, *col, p, group, pm)
                if c is None:
                    continue
                row = []
                for d in depths:
                    ok, n = counts(c, d)
                    row.append(f"{ok}/{n}" if n else "")
                lines.append(f"| {_budget_label(group, groups)} | {_display(p, pm)} | {col[0]} "
                             f"{_len_label(col[1])} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _budget_axis(ax, budgets: list[int]) -> None:
    """x axis of a vs-budget panel: log2 scale ticked at the measured budgets (none: linear)."""
    if budgets:
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("KV budget (tokens per head)")
    ax.grid(alpha=0.3)


def _save(fig, path: Path, legend=None) -> Path:
    """Write ``fig`` to ``path`` (no Software stamp, so reruns give the same bytes) and free it;
    ``legend``: the axes that carries the figure's one legend (then the layout is tightened)."""
    import matplotlib.pyplot as plt

    if legend is not None:
        legend.legend(fontsize=7)
        fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def plot_retrieval(data: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in _cells(data) if c["results"]]
    if not cells:
        return []
    task = data["task"]
    paths = []
    depths = depths_of(cells)
    for p, pm in _variants(cells):
        mine = [c for c in cells if c["policy"] == p and (p == "full" or _prompt_of(c) == pm)]
        if not mine:
            continue
        groups = [g for g in _groups(mine)]
        fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups) + 0.8, 3.2),
                                 squeeze=False)
        for ax, g in zip(axes[0], groups):
            cols = _columns([c for c in mine if _group_of(c) == g])
            grid = [[float("nan")] * len(cols) for _ in depths]
            for j, col in enumerate(cols):
                c = _find(mine, *col, p, g, pm)
                for i, d in enumerate(depths):
                    ok, n = counts(c, d)
                    if n:
                        grid[i][j] = ok / n
                        ax.text(j, i, f"{100 * ok / n:.0f}", ha="center", va="center", fontsize=8)
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(cols)), [f"{_len_label(n)}" for _, n in cols])
            first = ax is axes[0][0]  # depth labels once, at the left: the panels share them
            ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths] if first else [])
            ax.set_xlabel("context length")
            if first:
                ax.set_ylabel("needle depth")
            ax.set_title("full cache" if g is None else f"budget {_budget_label(g, groups)}",
                         fontsize=8)
        fig.colorbar(im, ax=axes[0].tolist(), label="accuracy", shrink=0.8)
        fig.suptitle(f"{task}: {_display(p, pm)}", fontsize=10)
        suffix = "" if pm == "stream" else "_" + pm
        paths.append(_save(fig, out / f"{task}_heatmap_{p}{suffix}.png"))
    cols = _columns(cells)
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.4), squeeze=False)
    for ax, col in zip(axes[0], cols):
        here = [c for c in cells if (c["dataset"], c["length"]) == col]
        for p, pm in _variants(here):
            mine = [c for c in here if c["policy"] == p and (p == "full" or _prompt_of(c) == pm)]
            if p == "full":
                if mine and mine[0]["results"]:
                    ok, n = counts(mine[0])
                    ax.axhline(ok / n, color="black", ls="--", lw=1, label=DISPLAY[p])
                continue
            pts = sorted((c["budget"], *counts(c)) for c in mine)
            if pts:
                xs = [b for b, _, _ in pts]
                ys = [ok / n for _, ok, n in pts]
                lo = [ok / n - wilson(ok, n)[0] for _, ok, n in pts]
                hi = [wilson(ok, n)[1] - ok / n for _, ok, n in pts]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o" if pm == "stream" else "s",
                            ls="-" if pm == "stream" else "--", capsize=2,
                            label=_display(p, pm))
        _budget_axis(ax, sorted({c["budget"] for c in here if c["policy"] != "full"}))
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{task}, {col[0]}, context {_len_label(col[1])}", fontsize=9)
        ax.set_ylabel("accuracy")
    return paths + [_save(fig, out / f"{task}_acc_vs_budget.png", legend=axes[0][-1])]


# -- KL ----------------------------------------------------------------------------------------


def kl_means(cell: dict) -> tuple[float, float, int]:
    """(mean KL, mean agreement, documents): per-document averages, averaged over documents."""
    res = list(cell["results"].values())
    if not res:
        return float("nan"), float("nan"), 0
    return (sum(r["kl"] for r in res) / len(res), sum(r["agree"] for r in res) / len(res), len(res))


def kl_markdown(data: dict) -> str:
    cfg, cells = data["config"], _cells(data)
    cols = _columns(cells)
    lines = [f"Next-token fidelity against the full cache: mean KL(p_full || p_policy) in nats per "
             f"token (top-1 agreement with the full cache in parentheses), per-document averages "
             f"averaged over documents. Model `{cfg['model']}` ({cfg['dtype']}), chunk size "
             f"{cfg['chunk_size']}.", "",
             "| Budget | Policy | " + " | ".join(f"{d} {_len_label(n)}" for d, n in cols)
             + " | mean |", "|---|---|" + "---:|" * (len(cols) + 1)]
    groups = _groups(cells)
    for group in groups:
        pols = [p for p in POLICIES if any(c["policy"] == p and _group_of(c) == group for c in cells)]
        vals = {p: [(_find(cells, *col, p, group)) for col in cols] for p in pols}
        best = {}
        for j in range(len(cols)):
            ks = [kl_means(vals[p][j])[0] for p in pols if p != "full" and vals[p][j]]
            best[j] = min(ks) if len(ks) > 1 else None
        for i, p in enumerate(pols):
            row, ks, ags = [], [], []
            for j, c in enumerate(vals[p]):
                if c is None or not c["results"]:
                    row.append("")
                    continue
                k, a, _ = kl_means(c)
                ks.append(k)
                ags.append(a)
                txt = f"{k:.3f} ({100 * a:.1f}%)"
                row.append(f"**{txt}**" if best[j] is not None and k == best[j] else txt)
            mean = f"{sum(ks) / len(ks):.3f} ({100 * sum(ags) / len(ags):.1f}%)" if ks else ""
            lines.append(f"| {_budget_label(group, groups) if i == 0 else ''} | {DISPLAY[p]} | "
                         + " | ".join(row) + f" | {mean} |")
    lines.append("")
    for name, desc in cfg.get("datasets", {}).items():
        docs = {d for c in cells if c["dataset"] == name for d in c["results"]}
        if docs:
            lines.append(f"- `{name}`: {len(docs)} document(s): {', '.join(sorted(docs))}.")
    secs = sum(c["seconds"] for c in cells)
    lines.append(f"- {len(cells)} cells, {secs:.0f} s of policy-model time (the full-cache "
                 "reference runs are not counted).")
    return "\n".join(lines)


def plot_kl(data: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in _cells(data) if c["results"] and c["policy"] != "full"]
    if not cells:
        return []
    cols = _columns(cells)
    fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols), 3.4), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for p in POLICIES:
            pts = sorted((c["budget"], kl_means(c)[0]) for c in cells
                         if (c["dataset"], c["length"]) == col and c["policy"] == p)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=DISPLAY[p])
        _budget_axis(ax, sorted({c["budget"] for c in cells
                                 if (c["dataset"], c["length"]) == col}))
        ax.set_yscale("log")
        ax.set_title(f"{col[0]}, length {_len_label(col[1])}", fontsize=9)
        ax.set_ylabel("KL(full || policy), nats/token")
    return [_save(fig, out / "kl_vs_budget.png", legend=axes[0][-1])]


def markdown(data: dict) -> str:
    return kl_markdown(data) if data["task"] == "kl" else retrieval_markdown(data)


def main(argv=None) -> int:
    """``python -m weightedkv_ext.eval.taskreport DIR... [--merge OUT [--balanced]]``: rewrite the
    tables and plots of the ``results_<task>.json`` files in each folder (no model run); with
    ``--merge``, write the union of each task's files (``taskrun.merge_results``: lanes of one
    experiment run in parallel, each with its own ``--out``) and its report into OUT instead,
    with ``--balanced`` trimmed to the prompt indices present at every depth (``taskrun.balance``)."""
    import argparse
    import json

    from .taskrun import balance, merge_results

    parser = argparse.ArgumentParser(prog="python -m weightedkv_ext.eval.taskreport",
                                     description="Rewrite the tables and plots of the task results "
                                     "(results_<task>.json) in each DIR, or with --merge write "
                                     "the union of their results, per task, and its report into "
                                     "OUT (lanes of one experiment run in parallel, each with "
                                     "its own --out).")
    parser.add_argument("folders", nargs="+", metavar="DIR")
    parser.add_argument("--merge", metavar="OUT", default=None,
                        help="write the union of the folders' results (per task) into OUT")
    parser.add_argument("--balanced", action="store_true",
                        help="with --merge: keep in each retrieval cell only the prompt indices "
                        "present at every depth (a top-up interrupted part-way runs depth by depth "
                        "and would skew the cell's depth mix)")
    args = parser.parse_args(argv)
    if args.balanced and args.merge is None:
        parser.error("argument --balanced: only with --merge OUT")
    by_task: dict[str, list] = {}
    for folder in args.folders:
        if not Path(folder).is_dir():
            parser.error(f"argument DIR: {folder!r} is not a folder")
        for path in sorted(Path(folder).glob("results_*.json")):
            data = json.loads(path.read_text(encoding="utf-8"))
            if "task" in data:
                by_task.setdefault(path.name, []).append((str(path), data))
    if args.merge is None:
        for sources in by_task.values():
            for path, data in sources:
                for p in write(data, Path(path).parent):
                    print(p)
        return 0
    if not by_task:
        parser.error("argument DIR: no task results (results_<task>.json) in " +
                     ", ".join(repr(f) for f in args.folders))
    out = Path(args.merge)
    for file_name, sources in by_task.items():
        try:
            merged = merge_results(sources)
        except ValueError as e:
            parser.error(str(e))
        if args.balanced:
            for key, n in balance(merged).items():
                print(f"{file_name}: {key}: dropped {n} prompts (indices not run at every depth)")
        out.mkdir(parents=True, exist_ok=True)
        (out / file_name).write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
        print(out / file_name)
        for p in write(merged, out):
            print(p)
    return 0


def write(data: dict, out, plots: bool = True) -> list[Path]:
    """Write ``results_<task>.md`` (and the plots) into ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / md_name(data["task"])
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(markdown(data) + "\n", encoding="utf-8")
    tmp.replace(md)
    if not plots:
        return [md]
    pngs = plot_kl(data, out) if data["task"] == "kl" else plot_retrieval(data, out)
    return [md, *pngs]


if __name__ == "__main__":
    raise SystemExit(main())
