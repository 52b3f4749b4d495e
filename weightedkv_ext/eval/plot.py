"""PNG plot of perplexity vs budget per policy (one panel per dataset x context)."""
from __future__ import annotations

from pathlib import Path

from .caches import DISPLAY, POLICIES
from .report import _ctx_label, columns, ppl


def plot(data: dict, path: str | Path) -> Path | None:
    """Write the plot; returns its path, or None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns(data)
    if not cols:
        return None
    cells = list(data["cells"].values())
    n = len(cols)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, (dataset, context) in zip(axes[0], cols):
        here = [c for c in cells if c["dataset"] == dataset and c["context"] == context]
        for policy in POLICIES:
            if policy == "full":
                full = [c for c in here if c["policy"] == "full"]
                if full:
                    ax.axhline(ppl(full[0]), color="black", ls="--", lw=1, label=DISPLAY["full"])
                continue
            pts = sorted((c["budget"], ppl(c)) for c in here if c["policy"] == policy)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=DISPLAY[policy])
        ax.set_xscale("log", base=2)
        budgets = sorted({c["budget"] for c in here if c["policy"] != "full"})
        if budgets:
            ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_title(f"{dataset}, context {_ctx_label(context)}")
        ax.set_xlabel("KV budget (tokens per head)")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    cfg = data["config"]
    fig.suptitle(f"{cfg['model']} ({cfg['dtype']}), chunk size {cfg['chunk_size']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
