"""The one place the harness builds caches and prepares models for them."""
from __future__ import annotations

from typing import Callable

# Policies (canonical table order, the paper's names), the default-recent rule and the GQA score
# reductions come from the one registry, weightedkv_ext/policies.py (re-exported for the CLI).
from ..policies import DISPLAY, GROUP_REDUCES, POLICIES, default_recent  # noqa: F401

# The harness's prompt variants -> the cache's prompt options (weightedkv_ext/prompt.py).
PROMPT_VARIANTS = {
    "stream": {},
    "snapkv": dict(prompt_mode="snapkv", prompt_merge=False),
    "snapkv_merge": dict(prompt_mode="snapkv", prompt_merge=True),
}
PROMPT_DISPLAY = {"stream": "", "snapkv": " + SnapKV prompt",
                  "snapkv_merge": " + SnapKV prompt, merged"}


def prepare(model):
    """Switch a loaded model to the ``weightedkv`` attention (all policies, ``full`` included)."""
    from ..attention import enable

    return enable(model)


def cache_factory(policy: str, budget: int | None, sinks: int, recent: int | None,
                  chunk_size: int, cam_window: int = 16, seed: int = 0,
                  backend: str = "ops", group_reduce: str = "mean", prompt: str = "stream",
                  prompt_window: int = 32, prompt_pool: int = 7) -> Callable[[], object]:
    """A function returning a fresh, empty cache for one batch of windows. ``prompt``: one of
    ``PROMPT_VARIANTS``; its prompt ends when the harness calls ``cache.end_prompt()``."""
    from ..cache import WeightedKVCache

    if policy == "full":
        budget, recent = None, None
    extra = dict(PROMPT_VARIANTS[prompt])
    if extra:
        extra.update(prompt_window=prompt_window, prompt_pool=prompt_pool, prompt_end="manual")

    def make():
        return WeightedKVCache(budget, sinks=sinks, recent=recent, policy=policy,
                               chunk_size=chunk_size, cam_window=cam_window, seed=seed,
                               group_reduce=group_reduce, backend=backend, **extra)

    make()  # validate the arguments now, not in the middle of a run
    return make
