"""The plugin's settings, read from the environment variable ``WEIGHTEDKV_VLLM``.

vLLM runs the model in another process (the engine core) and loads plugins there through the
``vllm.general_plugins`` entry point, so the settings travel as one environment variable, e.g.

    WEIGHTEDKV_VLLM="budget=256"                   (policy weightedkv, sinks 4, recent 124)
    WEIGHTEDKV_VLLM="budget=256,policy=h2o,sinks=4,recent=60,chunk_size=128"

Unset or empty: the plugin does nothing. The keys, their defaults and their validation are those of
``weightedkv_ext.WeightedKVCache`` (one source of truth), except ``policy="full"`` (that is vLLM
without the plugin) and ``backend`` (always the compiled ops).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

ENV = "WEIGHTEDKV_VLLM"
_INT_KEYS = ("budget", "sinks", "recent", "chunk_size", "cam_window", "seed")
_STR_KEYS = ("policy", "group_reduce")


@dataclass(frozen=True)
class Settings:
    budget: int
    sinks: int
    recent: int
    policy: str
    chunk_size: int
    cam_window: int
    seed: int
    group_reduce: str

    @property
    def capacity(self) -> int:
        """Slots per (request, layer, KV head): ``budget + chunk_size``, as in WeightedKVCache."""
        return self.budget + self.chunk_size

    @property
    def window(self) -> int:
        """The sliding window declared to vLLM's KV manager: it keeps the blocks of the last
        ``window - 1`` computed tokens of a request, exactly the ``capacity`` logical slots that
        hold its compressed cache (docs/serving.md, "Where the slots live")."""
        return self.capacity + 1

    def cache(self):
        """A ``WeightedKVCache`` with these settings (its ``ops``, policy and validation)."""
        from ..cache import WeightedKVCache

        return WeightedKVCache(budget=self.budget, sinks=self.sinks, recent=self.recent,
                               policy=self.policy, chunk_size=self.chunk_size,
                               cam_window=self.cam_window, seed=self.seed,
                               group_reduce=self.group_reduce)


def parse(text: str) -> Settings:
    """Parse ``"budget=256,policy=weightedkv,..."`` into validated ``Settings``."""
    kwargs: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in _INT_KEYS + _STR_KEYS:
            raise ValueError(f"{ENV}: cannot read {item!r}; expected comma-separated key=value "
                             f"pairs with keys {_INT_KEYS + _STR_KEYS}, e.g. {ENV}='budget=256'")
        if key in _INT_KEYS:
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise ValueError(f"{ENV}: {key} must be an integer, got {key}={value!r}") from None
        else:
            kwargs[key] = value
    if "budget" not in kwargs:
        raise ValueError(f"{ENV}: budget is required, got {ENV}={text!r}; e.g. {ENV}='budget=256'")
    if kwargs.get("policy") == "full":
        raise ValueError(f"{ENV}: policy='full' keeps every token, which is vLLM without the "
                         f"plugin; unset {ENV} instead")
    from ..cache import WeightedKVCache

    c = WeightedKVCache(**kwargs)  # defaults (recent = budget // 2 - sinks) and validation
    return Settings(budget=c.budget, sinks=c.sinks, recent=c.recent, policy=c.policy,
                    chunk_size=c.chunk_size, cam_window=c.cam_window, seed=c.seed,
                    group_reduce=c.group_reduce)


@functools.lru_cache(maxsize=None)
def _parse_cached(text: str) -> Settings:
    return parse(text)


def from_env() -> Settings | None:
    """The settings in ``$WEIGHTEDKV_VLLM``, or None when it is unset or empty."""
    text = os.environ.get(ENV, "").strip()
    return _parse_cached(text) if text else None
