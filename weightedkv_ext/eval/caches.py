"""The one place the harness builds caches and prepares models for them."""
from __future__ import annotations

from typing import Callable

# How the query heads sharing a KV head (GQA) are combined into one score; "mean" is the default.
from ..ops import GROUP_REDUCES  # noqa: F401  (re-exported for the CLI)


# Canonical order (rows of the table, lines of the plot); names as in the paper.
POLICIES = ("full", "streaming", "tova", "h2o", "cam", "evict", "weightedkv")
DISPLAY = {
    "full": "Full cache",
    "streaming": "StreamingLLM",
    "tova": "TOVA",
    "h2o": "H2O",
    "cam": "CaM",
    "evict": "Evict (no merge)",
    "weightedkv": "WeightedKV",
}


def default_recent(budget: int, sinks: int) -> int:
    """The paper's rule: half of the budget is the recent window (sinks included)."""
    return budget // 2 - sinks


def prepare(model):
    """Switch a loaded model to the ``weightedkv`` attention (all policies, ``full`` included)."""
    from ..attention import enable

    return enable(model)


def cache_factory(policy: str, budget: int | None, sinks: int, recent: int | None,
                  chunk_size: int, cam_window: int = 16, seed: int = 0,
                  backend: str = "ops", group_reduce: str = "mean") -> Callable[[], object]:
    """A function returning a fresh, empty cache for one batch of windows."""
    from ..cache import WeightedKVCache

    if policy == "full":
        budget, recent = None, None

    def make():
        return WeightedKVCache(budget, sinks=sinks, recent=recent, policy=policy,
                               chunk_size=chunk_size, cam_window=cam_window, seed=seed,
                               group_reduce=group_reduce, backend=backend)

    make()  # validate the arguments now, not in the middle of a run
    return make
