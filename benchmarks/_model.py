"""SmolLM2 helpers of the model benchmarks: loading, a token stream, chunked prefill, op timers."""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from weightedkv_ext import WeightedKVCache, data, models


# The keyword transformers' forward takes the cache under (``cache`` from transformers 5.24, else
# ``past_key_values``), as WeightedKVCache.as_kwargs() reports it; DynamicCache goes under it too.
CACHE_KWARG = next(iter(WeightedKVCache(None, policy="full").as_kwargs()))


def cache_kwargs(cache) -> dict:
    return cache.as_kwargs() if hasattr(cache, "as_kwargs") else {CACHE_KWARG: cache}


def load():
    """SmolLM2-135M-Instruct in float32 with the ``weightedkv`` attention (sdpa for other caches)."""
    return models.load_smollm2(dtype=torch.float32)


def token_ids(tokenizer, n: int, batch: int) -> torch.Tensor:
    """``[batch, n]`` token ids of the embedded default text (row b starts b*97 tokens later)."""
    ids = tokenizer(data.default_text(), return_tensors="pt").input_ids[0]
    need = n + 97 * (batch - 1)
    if ids.numel() < need:
        ids = ids.repeat(need // ids.numel() + 1)
    return torch.stack([ids[b * 97: b * 97 + n] for b in range(batch)])


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, cache, chunk: int = 512) -> torch.Tensor:
    """Feeds ``ids`` in chunks; returns the greedy next token ``[B, 1]``."""
    logits = None
    for s in range(0, ids.shape[1], chunk):
        logits = model(input_ids=ids[:, s:s + chunk], **cache_kwargs(cache), use_cache=True).logits
    return logits[:, -1:].argmax(-1)


@torch.inference_mode()
def step(model, tok: torch.Tensor, cache) -> torch.Tensor:
    """One decode step; returns the next greedy token."""
    return model(input_ids=tok, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)


class TimedOps:
    """Proxy of the ops module that accumulates wall time per op (explicit perf_counter timers)."""

    def __init__(self, ops):
        self._ops = ops
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self._wrapped = {}

    def reset(self):
        self.seconds.clear()
        self.calls.clear()

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        fn = self._wrapped.get(name)
        if fn is None:
            target = getattr(self._ops, name)

            def fn(*args, _t=target, _n=name, **kwargs):
                t0 = time.perf_counter()
                out = _t(*args, **kwargs)
                self.seconds[_n] += time.perf_counter() - t0
                self.calls[_n] += 1
                return out

            self._wrapped[name] = fn
        return fn


class TimedCache(WeightedKVCache):
    """A WeightedKVCache whose ops calls are timed (``cache.timer``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from weightedkv_ext import ops
        self.timer = TimedOps(ops)

    @property
    def ops(self):
        return self.timer


def kv_bytes(cache) -> int:
    """Bytes of the K/V tensors a cache holds allocated (DynamicCache or WeightedKVCache)."""
    if isinstance(cache, WeightedKVCache):
        return sum(layer.keys.numel() * layer.keys.element_size() * 2
                   for layer in cache.layers if layer.is_initialized)
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
