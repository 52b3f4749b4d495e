"""``WeightedKVCache``: a transformers ``Cache`` holding a fixed budget of KV slots per layer.

Each layer (``WeightedKVLayer``) owns the six slot tensors of docs/design.md and per-row counters.
``update()`` only stashes the new (post-RoPE) keys/values and returns them tagged with the layer;
the registered ``weightedkv`` attention function (attention.py) finds the layer through that tag and
runs append -> attention -> compress chunk by chunk. Nothing is process-wide: two models with two
caches can run in two threads.

Use it with a model whose attention implementation is ``"weightedkv"``::

    model = weightedkv_ext.enable(model)  # or attn_implementation="weightedkv" at load time
    cache = WeightedKVCache(budget=256)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
"""
from __future__ import annotations

import inspect

import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache, CacheLayerMixin

from . import attention as _attention  # noqa: F401  (registers the "weightedkv" attention + mask)
from . import ops, reference

# transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns until 5.40).
_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters \
    else "past_key_values"

POLICIES = ops.POLICIES + ("full",)  # the engine's policies, plus no compression
BACKENDS = ("ops", "reference")
GROUP_REDUCES = ops.GROUP_REDUCES

_ENABLE_HINT = ('call weightedkv_ext.enable(model) (or load the model with '
                'attn_implementation="weightedkv")')


def _fail(what: str, msg: str):
    raise ValueError(f"WeightedKVCache: {what} {msg}")


INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1  # the ops take int64 arguments


def _check_int(name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, f"must be an int >= {minimum}, got {name}={value!r}")
    if value > INT64_MAX:
        _fail(name, f"must be an int <= 2**63 - 1 (int64), got {name}={value!r}")


class WeightedKVLayer(CacheLayerMixin):
    """One layer: the slots ``keys``, ``values``, ``scores``, ``counts``, ``last``, ``slot_pos``.

    ``seen`` counts the columns (new tokens, padding included) this layer has received, which is
    what transformers expects from ``get_seq_length``; ``row_seen[b]`` counts the real tokens of
    row ``b`` and gives the absolute (RoPE) position of the next one.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "WeightedKVCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self._clear()

    def _clear(self):
        self.keys = self.values = self.scores = self.counts = self.last = self.slot_pos = None
        self.row_seen = None
        self.seen = 0
        self.pending = False  # True between update() and the attention function consuming it
        self.peak_block = 0  # largest attention block built: queries x slots (per row, query head)
        self.is_initialized = False

    # -- transformers CacheLayerMixin API ------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        c = self.cache
        capacity = c.chunk_size if c.policy == "full" else c.budget + c.chunk_size
        self._allocate(B, H, capacity, D, key_states.dtype, key_states.device)
        self.row_seen = torch.zeros(B, dtype=torch.int64, device=key_states.device)
        self.is_initialized = True

    def _allocate(self, B, H, C, D, dtype, device):
        f32 = dict(dtype=torch.float32, device=device)
        self.keys = torch.zeros(B, H, C, D, dtype=dtype, device=device)
        self.values = torch.zeros(B, H, C, D, dtype=dtype, device=device)
        self.scores = torch.zeros(B, H, C, **f32)
        self.counts = torch.zeros(B, H, C, **f32)
        self.last = torch.zeros(B, H, C, **f32)
        self.slot_pos = torch.full((B, H, C), -1, dtype=torch.int64, device=device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending:
            raise RuntimeError(
                f"WeightedKVCache: layer {self.layer_idx} was updated twice without its attention "
                f"running in between: the model does not use the 'weightedkv' attention; "
                f"{_ENABLE_HINT}.")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, _, D = self.keys.shape
        shape = tuple(key_states.shape)
        if shape[0] != B or shape[1] != H or shape[3] != D or tuple(value_states.shape) != shape:
            raise ValueError(
                f"WeightedKVCache: layer {self.layer_idx} holds batch={B}, kv_heads={H}, "
                f"head_dim={D}, got key_states {shape} and value_states "
                f"{tuple(value_states.shape)} "
                "(call cache.reset() before reusing the cache for another batch)")
        if key_states.dtype != self.keys.dtype or key_states.device != self.keys.device:
            raise ValueError(
                f"WeightedKVCache: layer {self.layer_idx} holds {self.keys.dtype} on "
                f"{self.keys.device}, got key_states {key_states.dtype} on {key_states.device}")
        self.seen += shape[2]
        self.pending = True
        # Tag views (not the caller's tensors) with this layer: the attention function reads it.
        keys, values = key_states.view_as(key_states), value_states.view_as(value_states)
        keys._wkv_layer = self
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Only the sdpa fallback uses these sizes; the weightedkv attention masks by slot_pos.
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1  # any number of tokens can stream through a fixed budget

    def reset(self) -> None:
        self._clear()

    def offload(self):
        raise NotImplementedError("WeightedKVCache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("WeightedKVCache does not support offloading")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("WeightedKVCache cannot be cropped (compressed tokens are gone)")

    def _index_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.keys.device)
        for name in ("keys", "values", "scores", "counts", "last", "slot_pos", "row_seen"):
            setattr(self, name, getattr(self, name).index_select(0, index).contiguous())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(torch.as_tensor(indices, dtype=torch.long))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            B = self.keys.shape[0]
            self._index_batch(torch.arange(B).repeat_interleave(repeats))

    # -- used by the attention function --------------------------------------------------------

    @property
    def state(self) -> tuple[torch.Tensor, ...]:
        """The six slot tensors, in the argument order of the ops."""
        return self.keys, self.values, self.scores, self.counts, self.last, self.slot_pos

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reserve(self, n_new: int) -> None:
        """Make room for ``n_new`` tokens per row (``full`` grows by doubling; others fit)."""
        if self.cache.policy != "full":
            return  # compress keeps <= budget held, and budget + chunk_size slots are allocated
        held = int((self.slot_pos >= 0).sum(-1).max())
        if held + n_new <= self.capacity:
            return
        C = self.capacity
        while held + n_new > C:
            C *= 2
        old = self.state
        B, H, _, D = self.keys.shape
        self._allocate(B, H, C, D, self.keys.dtype, self.keys.device)
        n = old[0].shape[2]
        for new_t, old_t in zip(self.state, old):
            new_t[:, :, :n].copy_(old_t)

    def held_tokens(self) -> torch.Tensor:
        """Number of held tokens per (batch, KV head), int64 ``[B, H]``."""
        if not self.is_initialized:
            return torch.zeros(0, 0, dtype=torch.int64)
        return (self.slot_pos >= 0).sum(-1)

    def memory_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self.state, self.row_seen))


class WeightedKVCache(Cache):
    """KV cache compressed to ``budget`` tokens per (layer, batch row, KV head).

    Args:
        budget: tokens held per head after each chunk (ignored by ``policy="full"``, may be None).
        sinks: the first tokens that are never removed (attention sinks).
        recent: the most recent tokens that are never removed; ``None`` -> ``budget // 2 - sinks``
            (the paper's rule).
        policy: one of ``POLICIES``: ``weightedkv`` (the paper), ``evict`` (same choice, no merge),
            ``h2o``, ``tova``, ``streaming``, ``cam`` or ``full`` (no compression).
        chunk_size: new tokens are processed (append -> attention -> compress) in chunks of this
            size, so a long prefill never materialises more than ``chunk_size x slots`` scores and
            the cache holds at most ``budget + chunk_size`` slots.
        cam_window, seed: CaM's merge window and the seed of its random draw. CaM's draw
            depends on the batch row index (``uniform(seed, b, h, pos)``, docs/design.md), so for
            ``policy="cam"`` a row of a padded batch equals its solo run only when it has the same
            row index there (e.g. row 0 of the batch vs. the sequence alone); for every other
            policy each row of a padded batch equals its solo run exactly.
        group_reduce: how the G query heads of a KV head are combined into one score
            (``mean``, ``sum`` or ``max``).
        backend: ``"ops"`` (compiled kernels, default) or ``"reference"`` (pure PyTorch, slow).
    """

    def __init__(self, budget: int | None, sinks: int = 4, recent: int | None = None,
                 policy: str = "weightedkv", chunk_size: int = 128, cam_window: int = 16,
                 seed: int = 0, group_reduce: str = "mean", backend: str = "ops"):
        if policy not in POLICIES:
            _fail("policy", f"must be one of {POLICIES}, got policy={policy!r}")
        if backend not in BACKENDS:
            _fail("backend", f"must be one of {BACKENDS}, got backend={backend!r}")
        if group_reduce not in GROUP_REDUCES:
            _fail("group_reduce",
                  f"must be one of {GROUP_REDUCES}, got group_reduce={group_reduce!r}")
        _check_int("chunk_size", chunk_size, 1)
        _check_int("cam_window", cam_window, 1)
        _check_int("sinks", sinks, 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            _fail("seed", f"must be an int, got seed={seed!r}")
        if not INT64_MIN <= seed <= INT64_MAX:
            _fail("seed", f"must be an int in [-2**63, 2**63 - 1] (int64), got seed={seed!r}")
        if policy == "full" and budget is None:
            recent = 0 if recent is None else recent
            _check_int("recent", recent, 0)
        else:
            _check_int("budget", budget, 1)
            if recent is None:
                recent = budget // 2 - sinks
                if recent < 0:
                    _fail("recent", f"defaults to budget // 2 - sinks, which is negative for "
                                    f"budget={budget}, sinks={sinks}; pass recent explicitly")
            _check_int("recent", recent, 0)
            if policy != "full" and budget <= sinks + recent:
                _fail("budget", f"must exceed sinks + recent, got budget={budget}, sinks={sinks}, "
                                f"recent={recent}")
        super().__init__(layers=[])
        self.budget, self.sinks, self.recent, self.policy = budget, sinks, recent, policy
        self.chunk_size, self.cam_window, self.seed = chunk_size, cam_window, seed
        self.group_reduce, self.backend = group_reduce, backend
        self._last_updated: WeightedKVLayer | None = None

    def __repr__(self):
        return (f"WeightedKVCache(budget={self.budget}, sinks={self.sinks}, recent={self.recent}, "
                f"policy={self.policy!r}, chunk_size={self.chunk_size}, backend={self.backend!r}, "
                f"layers={len(self.layers)})")

    @property
    def ops(self):
        """The module implementing append/accumulate/compress/decode_attention for this cache."""
        return ops if self.backend == "ops" else reference

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs):
        last = self._last_updated
        if last is not None and last.pending and last.layer_idx != layer_idx:
            raise RuntimeError(
                f"WeightedKVCache: the new keys/values of layer {last.layer_idx} were never "
                f"consumed by the 'weightedkv' attention function (the model uses another "
                f"attention implementation); {_ENABLE_HINT}.")
        self._check_layer_count(layer_idx, key_states)
        while len(self.layers) <= layer_idx:
            self.layers.append(WeightedKVLayer(self, len(self.layers)))
        layer = self.layers[layer_idx]
        self._last_updated = layer
        return layer.update(key_states, value_states)

    def _check_layer_count(self, layer_idx: int, key_states: torch.Tensor) -> None:
        """Every forward updates layers 0, 1, ... with the same new tokens, so after its update
        layer ``layer_idx`` must have seen as many columns as layer 0 (updated first). A model with
        another number of layers breaks this: a new layer appears after layer 0 saw tokens, or a
        layer the other model did not have falls behind."""
        if layer_idx == 0 or not self.layers:
            return
        have = self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0
        new = key_states.shape[2] if key_states.dim() == 4 else 0
        if have + new != self.layers[0].seen:
            raise ValueError(
                f"WeightedKVCache: layer {layer_idx} would have seen {have + new} tokens after this "
                f"update, but layer 0 has seen {self.layers[0].seen}: the cache was used by a model "
                f"with another number of layers (it holds {len(self.layers)}); call cache.reset() "
                f"before reusing it with another model")

    def reset(self):
        super().reset()
        self._last_updated = None

    def as_kwargs(self) -> dict:
        """``{"cache": self}`` where the installed transformers names the argument ``cache``
        (5.24 and later), else ``{"past_key_values": self}``: ``model(ids, **cache.as_kwargs())``."""
        return {_CACHE_KWARG: self}

    def held_tokens(self) -> torch.Tensor:
        """Held tokens per (layer, batch row, KV head), int64 ``[layers, B, H]``."""
        held = [layer.held_tokens() for layer in self.layers if layer.is_initialized]
        if not held:
            return torch.zeros(0, 0, 0, dtype=torch.int64)
        return torch.stack([h.cpu() for h in held])

    def memory_bytes(self) -> int:
        """Bytes allocated by all layers: slot K/V, statistics, positions and counters."""
        return sum(layer.memory_bytes() for layer in self.layers)

    def kv_bytes_held(self) -> int:
        """Bytes of the K/V rows actually holding a token (what a dense cache of them would use)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                D, size = layer.keys.shape[3], layer.keys.element_size()
                total += int(layer.held_tokens().sum()) * 2 * D * size
        return total
