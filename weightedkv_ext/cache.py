"""``WeightedKVCache``: the transformers door to ``KVEngine`` (a ``Cache`` of one engine per layer).

Each ``WeightedKVLayer`` wraps one ``engine.KVEngine``, which owns the slots and the whole
append -> attention -> compress step. ``update()`` checks the new keys/values against the layer and
hands them over; the registered ``weightedkv`` attention function (attention.py) then calls
``layer.attend(query, key, value, mask, scaling, ...)``. Nothing is process-wide: two models with
two caches can run in two threads.

Use it with a model whose attention implementation is ``"weightedkv"``::

    model = weightedkv_ext.enable(model)  # or attn_implementation="weightedkv" at load time
    cache = WeightedKVCache(budget=256)
    model.generate(**inputs, **cache.as_kwargs(), max_new_tokens=64)
"""
from __future__ import annotations

import inspect

import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache, CacheLayerMixin

from . import policies
from . import prompt as _prompt_mode
from .engine import BACKENDS, KVEngine, _op_module  # noqa: F401  (BACKENDS re-exported)

# transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns until 5.40).
_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters \
    else "past_key_values"

POLICIES = policies.POLICIES  # every policy= (the registry's table order)
GROUP_REDUCES = policies.GROUP_REDUCES

_ENABLE_HINT = ('call weightedkv_ext.enable(model) (or load the model with '
                'attn_implementation="weightedkv")')
_ENGINE_ARGS = ("budget", "sinks", "recent", "policy", "chunk_size", "cam_window", "seed",
                "group_reduce", "backend", "merge_target", "merge_gate", "merge_weights",
                *_prompt_mode.OPTIONS)


class WeightedKVLayer(CacheLayerMixin):
    """One layer: a ``KVEngine`` plus transformers' bookkeeping.

    ``seen`` counts the columns (new tokens, padding included) this layer has received, which is
    what transformers expects from ``get_seq_length``; the engine's ``row_seen[b]`` counts the
    real tokens of row ``b`` and gives the absolute (RoPE) position of the next one.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False  # the storage is shaped by the first real call

    def __init__(self, cache: "WeightedKVCache", layer_idx: int):  # noqa: D107
        # CacheLayerMixin.__init__ is not called: keys/values/is_initialized are the engine's.
        # No reference back to ``cache``: a layer -> cache edge would make every cache a
        # reference cycle, freed only by the cyclic GC (gigabytes held per dropped cache).
        self.layer_idx = layer_idx
        self.engine = KVEngine(**{a: getattr(cache, a) for a in _ENGINE_ARGS},
                               name=f"WeightedKVCache: layer {layer_idx}",
                               reset_hint="cache.reset()")
        self.seen = 0
        self.pending = False  # True between update() and the attention function consuming it
        self.columns = None  # layer 0 only: bool [B, seen], which cached columns were real

    # The engine's storage, read-only (tests and tools inspect it).
    keys = property(lambda self: self.engine.keys)
    values = property(lambda self: self.engine.values)
    scores = property(lambda self: self.engine.scores)
    counts = property(lambda self: self.engine.counts)
    last = property(lambda self: self.engine.last)
    slot_pos = property(lambda self: self.engine.slot_pos)
    merged = property(lambda self: self.engine.merged)
    row_seen = property(lambda self: self.engine.row_seen)
    state = property(lambda self: self.engine.state)
    capacity = property(lambda self: self.engine.capacity)
    peak_block = property(lambda self: self.engine.peak_block)
    is_initialized = property(lambda self: self.engine.is_initialized)

    def __repr__(self):
        return f"WeightedKVLayer({self.layer_idx}, {self.engine!r})"

    # -- transformers CacheLayerMixin API ------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the engine allocates on its first attend(), sized by the tokens it holds

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Check the new keys/values (nothing is written) and hand them to the attention."""
        if self.pending:
            raise RuntimeError(
                f"WeightedKVCache: layer {self.layer_idx} was updated twice without its attention "
                f"running in between: the model does not use the 'weightedkv' attention; "
                f"{_ENABLE_HINT}.")
        k, v = _autocast(key_states), _autocast(value_states)
        self.engine.check_kv(k, v, names=("key_states", "value_states"))
        self.seen += k.shape[2]
        self.pending = True
        # Hand-off: transformers passes the cache to update() but not to the attention function,
        # which receives only the module, the tensors update() returned and the forward kwargs;
        # so the returned keys (a view, never the caller's tensor) carry their layer. A lost
        # hand-off (another attention implementation) leaves this layer pending: the next
        # update() of any layer raises, naming it, before a later forward computes anything (the
        # first forward's attention over its own new tokens is exact anyway).
        keys = key_states.view_as(key_states)
        keys._wkv_layer = self
        return keys, value_states

    def attend(self, query, key, value, mask=None, scaling=None, *, window=None, softcap=None,
               sink_logits=None) -> torch.Tensor:
        """The attention step for the tokens of the last ``update()``: ``[B, Hq, T, D]``.

        ``mask``: the ``WeightedKVMask`` of attention.py (or None). On any exception the layer
        (engine included) is exactly as before ``update()``.
        """
        self.pending = False
        try:
            real = None if mask is None else mask.real
            columns = None
            if self.layer_idx == 0:
                if mask is not None:
                    self._check_cached_columns(mask)
                columns = self._columns_after(real, key)
            out = self.engine.attend(query, key, value, real=real, scale=scaling,
                                     window=window, softcap=softcap, sink_logits=sink_logits,
                                     caller="weightedkv attention")
        except BaseException:
            self.seen -= key.shape[2]  # undo update(): the layer is as before the call
            raise
        if columns is not None:
            self.columns = columns
        return out

    def _columns_after(self, real, key):
        """``columns`` once this call's tokens are cached (bool ``[B, seen]``, True = real)."""
        if not isinstance(key, torch.Tensor) or key.dim() != 4:
            return None
        B, _, T, _ = key.shape
        new = torch.ones(B, T, dtype=torch.bool, device=key.device) if real is None \
            else real.to(device=key.device, dtype=torch.bool)
        if self.columns is None or self.columns.shape[0] != B:
            return new if self.seen == T else None
        return torch.cat([self.columns, new], 1)

    def _check_cached_columns(self, mask) -> None:
        """A 2-D attention_mask may not change its verdict on a cached column (a token cannot be
        un-seen, padding was never stored). Layer 0 records which columns were real and checks
        the mask's cached columns against it (once per forward: every layer gets the same mask)."""
        past, cols = mask.past, self.columns
        if past is None or cols is None or tuple(past.shape) != tuple(cols.shape):
            return  # the mask does not cover exactly the cached columns: nothing to compare
        past = past.to(cols.device)
        if torch.equal(past, cols):
            return
        b, c = (past != cols).nonzero()[0].tolist()
        raise ValueError(
            f"weightedkv attention: the attention_mask marks cached column {c} of row {b} as "
            f"{'real' if past[b, c] else 'padding'}, but it was cached as "
            f"{'real' if cols[b, c] else 'padding'}: masking out (or un-masking) a token after "
            "it was cached is not supported; keep the mask's cached columns as they were "
            "(1 = real, 0 = padding) or start a new cache")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Only the sdpa fallback uses these sizes; the weightedkv attention masks by slot_pos.
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1  # any number of tokens can stream through a fixed budget

    def reset(self) -> None:
        self.engine.reset()
        self.seen = 0
        self.pending = False
        self.columns = None

    def offload(self):
        raise NotImplementedError("WeightedKVCache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("WeightedKVCache does not support offloading")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("WeightedKVCache cannot be cropped (compressed tokens are gone)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.engine.reorder(beam_idx)
        self._index_columns(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.engine.select(indices)
        self._index_columns(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.columns is not None:
            self.columns = self.columns.repeat_interleave(repeats, 0)
        self.engine.repeat_interleave(repeats)

    def _index_columns(self, index) -> None:
        if self.columns is not None:
            index = torch.as_tensor(index, dtype=torch.long).to(self.columns.device)
            self.columns = self.columns.index_select(0, index)

    def held_tokens(self) -> torch.Tensor:
        """Number of held tokens per (batch, KV head), int64 ``[B, H]``."""
        return self.engine.held_tokens()

    def memory_bytes(self) -> int:
        return self.engine.memory_bytes()


def _autocast(t):
    """Under ``torch.autocast`` the attention computes in the autocast dtype, like sdpa."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() \
            and torch.is_autocast_enabled(t.device.type):
        return t.to(torch.get_autocast_dtype(t.device.type))
    return t


class WeightedKVCache(Cache):
    """KV cache compressed to ``budget`` tokens per (layer, batch row, KV head).

    Args:
        budget: tokens held per head after each chunk (ignored by ``policy="full"``, may be None).
            Slots grow with the tokens held, so a huge budget (e.g. ``10**9``) means "no
            compression" without allocating it.
        sinks: the first tokens that are never removed (attention sinks).
        recent: the most recent tokens that are never removed; ``None`` -> ``budget // 2 - sinks``
            (the paper's rule).
        policy: one of ``POLICIES`` (``weightedkv_ext.policies`` describes each): ``weightedkv``
            (the paper), ``evict`` (same choice, no merge), ``h2o``, ``tova``, ``streaming``,
            ``cam`` or ``full`` (no compression). Sliding-window layers (Mistral, Gemma2/3, ...)
            keep exactly their window whatever the policy, so they stay exact.
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
        merge_target, merge_gate, merge_weights: weightedkv's merge rule (``policy="weightedkv"``
            only; the defaults ``"right"``, ``0``, ``"average"`` are the paper's): the merge target
            (``"similar"``: the more key-similar neighbour, ``"nearest"``: the most key-similar
            held token), a key-cosine gate below which a merge becomes an eviction, and the
            weights (``"mass"``: each slot's average times the tokens it carries). See
            ``ops.compress``; ``merge_stats()`` shows how merges pile up.
        prompt_mode, prompt_window, prompt_pool, prompt_budget, prompt_merge, prompt_end:
            ``prompt_mode="snapkv"`` holds the prompt and compresses it once, at its end, by the
            attention of its last ``prompt_window`` tokens (the question), then decodes with
            ``policy``; ``"stream"`` (default) compresses the prompt as it streams in. See
            ``weightedkv_ext.prompt`` and ``end_prompt()``.

    Integer arguments accept any integer-like value (``numpy.int64``), not bools.
    """

    def __init__(self, budget: int | None, sinks: int = policies.DEFAULT_SINKS,
                 recent: int | None = None, policy: str = "weightedkv",
                 chunk_size: int = policies.OPTIONS["chunk_size"],
                 cam_window: int = policies.OPTIONS["cam_window"],
                 seed: int = policies.OPTIONS["seed"],
                 group_reduce: str = policies.OPTIONS["group_reduce"],
                 backend: str = policies.OPTIONS["backend"], *,
                 merge_target: str = policies.MERGE_RULE_DEFAULT["merge_target"],
                 merge_gate: float | None = policies.MERGE_RULE_DEFAULT["merge_gate"],
                 merge_weights: str = policies.MERGE_RULE_DEFAULT["merge_weights"],
                 **prompt_options):
        # One set of rules: the engine validates (and resolves recent=None and the prompt options
        # against prompt.OPTIONS) for every layer.
        proto = KVEngine(budget, sinks, recent, policy, chunk_size, cam_window, seed,
                         group_reduce, backend, name="WeightedKVCache", merge_target=merge_target,
                         merge_gate=merge_gate, merge_weights=merge_weights, **prompt_options)
        super().__init__(layers=[])
        for a in _ENGINE_ARGS:
            setattr(self, a, getattr(proto, a))
        self._last_updated: WeightedKVLayer | None = None

    def __repr__(self):
        return (f"WeightedKVCache(budget={self.budget}, sinks={self.sinks}, recent={self.recent}, "
                f"policy={self.policy!r}, chunk_size={self.chunk_size}, backend={self.backend!r}, "
                f"layers={len(self.layers)})")

    @property
    def ops(self):
        """The module implementing append/accumulate/compress/decode_attention for this cache."""
        return _op_module(self.backend)

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
        keys, values = layer.update(key_states, value_states)
        self._last_updated = layer
        return keys, values

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

    def end_prompt(self) -> None:
        """End the prompt in every layer (``prompt_mode="snapkv"`` with chunked prefill or
        ``prompt_end="manual"``): each layer compresses its held prompt once to ``budget`` by the
        attention of its last ``prompt_window`` queries. A no-op in ``"stream"`` mode."""
        for layer in self.layers:
            layer.engine.end_prompt()

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

    def merge_stats(self) -> dict:
        """Over-merging per (layer, row, KV head): ``max`` int64 ``[layers, B, H]`` (the most
        evicted tokens one held slot has absorbed, transitively) and ``hist`` int64
        ``[layers, B, H, bins]`` (held slots absorbing 0, 1, 2-3, 4-7, ... tokens; see
        ``KVEngine.merge_stats``), zero-padded to a common number of bins."""
        stats = [layer.engine.merge_stats() for layer in self.layers if layer.is_initialized]
        if not stats:
            z = torch.zeros(0, 0, 0, dtype=torch.int64)
            return dict(max=z, hist=z[..., None])
        bins = max(s["hist"].shape[-1] for s in stats)
        hist = torch.stack([torch.nn.functional.pad(s["hist"].cpu(), (0, bins - s["hist"].shape[-1]))
                            for s in stats])
        return dict(max=torch.stack([s["max"].cpu() for s in stats]), hist=hist)

    def kv_bytes_held(self) -> int:
        """Bytes of the K/V rows actually holding a token (what a dense cache of them would use)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                D, size = layer.keys.shape[3], layer.keys.element_size()
                total += int(layer.held_tokens().sum()) * 2 * D * size
        return total
