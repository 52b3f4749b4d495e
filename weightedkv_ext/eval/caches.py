"""The one place the harness builds caches and prepares models for them."""
from __future__ import annotations

from typing import Callable

# Policies (canonical table order, the paper's names), the default-recent rule and the GQA score
# reductions come from the one registry, weightedkv_ext/policies.py (re-exported for the CLI).
from ..policies import DISPLAY, GROUP_REDUCES, POLICIES, default_recent  # noqa: F401


def prepare(model):
    """Switch a loaded model to the ``weightedkv`` attention (all policies, ``full`` included)."""
    from ..attention import enable

    return enable(model)


def cache_factory(policy: str, budget: int | None, sinks: int, recent: int | None,
                  chunk_size: int, cam_window: int = 16, seed: int = 0,
                  backend: str = "ops", group_reduce: str = "mean",
                  merge_rule: dict | None = None) -> Callable[[], object]:
    """A function returning a fresh, empty cache for one batch of windows. ``merge_rule``:
    weightedkv's merge options (``merge_target``/``merge_gate``/``merge_weights``), applied to
    ``policy="weightedkv"`` only."""
    from ..cache import WeightedKVCache

    if policy == "full":
        budget, recent = None, None
    rule = dict(merge_rule or {}) if policy == "weightedkv" else {}

    def make():
        return WeightedKVCache(budget, sinks=sinks, recent=recent, policy=policy,
                               chunk_size=chunk_size, cam_window=cam_window, seed=seed,
                               group_reduce=group_reduce, backend=backend, **rule)

    make()  # validate the arguments now, not in the middle of a run
    return make
