"""The one place the harness builds caches and prepares models for them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# Policies (canonical table order, the paper's names), the default-recent rule and the GQA score
# reductions come from the one registry, weightedkv_ext/policies.py (re-exported for the CLI).
from ..policies import DISPLAY, GROUP_REDUCES, POLICIES, default_recent  # noqa: F401
from ..policies import MERGE_RULE_DEFAULT
from ..policies import OPTIONS as ENGINE_OPTIONS
from ..prompt import OPTIONS as PROMPT_OPTIONS

# The harness's prompt variants -> the cache's prompt options (weightedkv_ext/prompt.py).
PROMPT_VARIANTS = {
    "stream": {},
    "snapkv": dict(prompt_mode="snapkv", prompt_merge=False),
    "snapkv_merge": dict(prompt_mode="snapkv", prompt_merge=True),
}
_VARIANT_DISPLAY = {"stream": "", "snapkv": " + SnapKV prompt",
                    "snapkv_merge": " + SnapKV prompt, merged"}


def prompt_name(variant: str, pool: int, default_pool: int) -> str:
    """A cell's prompt mode: the variant, plus ``_p<pool>`` when its pooling kernel is not the
    run's first (``--prompt-pool 7,15``: ``snapkv`` and ``snapkv_p15``)."""
    return variant if variant == "stream" or pool == default_pool else f"{variant}_p{pool}"


def parse_prompt(name: str, default_pool: int) -> tuple[str, int]:
    """(variant, pool) of a ``prompt_name``."""
    head, _, tail = name.rpartition("_p")
    if head in PROMPT_VARIANTS and tail.isdigit():
        return head, int(tail)
    return name, default_pool


def prompt_display(name: str) -> str:
    """How tables name a prompt mode (after the policy's name)."""
    variant, pool = parse_prompt(name, 0)
    return _VARIANT_DISPLAY[variant] + (f", pool {pool}" if pool else "")


def prompt_order(name: str) -> tuple:
    variant, pool = parse_prompt(name, 0)
    return list(PROMPT_VARIANTS).index(variant), pool


def prepare(model):
    """Switch a loaded model to the ``weightedkv`` attention (all policies, ``full`` included)."""
    from ..attention import enable

    return enable(model)


def cache_factory(policy: str, budget: int | None, sinks: int, recent: int | None,
                  chunk_size: int, *, prompt: str = "stream",
                  **options) -> Callable[[], object]:
    """``CacheOptions(chunk_size=chunk_size, **options).factory(...)``: a function returning a
    fresh, empty cache for one batch of windows."""
    return CacheOptions(chunk_size=chunk_size, **options).factory(policy, budget, sinks, recent,
                                                                  prompt=prompt)


@dataclass(frozen=True)
class CacheOptions:
    """The cache options every cell of a run shares, built once from the command line
    (``cli.parse_args``: ``args.cache_options``); a cell adds its policy, budget, sinks, recent
    and prompt variant (``factory``). ``prompt_pool``: the run's first pooling kernel (cells of
    the others name theirs, ``prompt_name``). ``merge_rule``: weightedkv's merge options
    (``merge_target``/``merge_gate``/``merge_weights``), applied to ``policy="weightedkv"`` only.
    The defaults are the engine's (``policies.OPTIONS``, ``prompt.OPTIONS``)."""

    chunk_size: int
    cam_window: int = ENGINE_OPTIONS["cam_window"]
    seed: int = ENGINE_OPTIONS["seed"]
    backend: str = ENGINE_OPTIONS["backend"]
    group_reduce: str = ENGINE_OPTIONS["group_reduce"]
    prompt_window: int = PROMPT_OPTIONS["prompt_window"]
    prompt_pool: int = PROMPT_OPTIONS["prompt_pool"]
    merge_rule: dict = field(default_factory=lambda: dict(MERGE_RULE_DEFAULT))

    def factory(self, policy: str, budget: int | None, sinks: int, recent: int | None, *,
                prompt: str = "stream") -> Callable[[], object]:
        """A function returning a fresh, empty cache for one batch of windows. ``prompt``: one
        of ``PROMPT_VARIANTS``; its prompt ends when the harness calls ``cache.end_prompt()``."""
        from ..cache import WeightedKVCache

        if policy == "full":
            budget, recent = None, None
        variant, pool = parse_prompt(prompt, self.prompt_pool)
        extra = dict(PROMPT_VARIANTS[variant])
        if extra:
            extra.update(prompt_window=self.prompt_window, prompt_pool=pool, prompt_end="manual")
        rule = dict(self.merge_rule) if policy == "weightedkv" else {}
        kwargs = dict(sinks=sinks, recent=recent, policy=policy, chunk_size=self.chunk_size,
                      cam_window=self.cam_window, seed=self.seed,
                      group_reduce=self.group_reduce, backend=self.backend, **extra, **rule)

        def make():
            return WeightedKVCache(budget, **kwargs)

        make()  # validate the arguments now, not in the middle of a run
        return make

    def config(self, prompt: bool) -> dict:
        """The options a run's results record: the prompt options only when a prompt mode other
        than ``stream`` runs (``prompt``), the merge rule only when it is not the paper's."""
        config = dict(chunk_size=self.chunk_size, cam_window=self.cam_window, seed=self.seed,
                      backend=self.backend, group_reduce=self.group_reduce)
        if prompt:
            config.update(prompt_window=self.prompt_window, prompt_pool=self.prompt_pool)
        if self.merge_rule != MERGE_RULE_DEFAULT:
            config["merge_rule"] = dict(self.merge_rule)
        return config
