"""Typed Python wrappers of the compiled ops ``torch.ops.weightedkv.*`` (contract: docs/design.md).

All the ops work on the fixed-slot cache of one layer: ``keys``/``values`` ``[B, H, C, D]``
(float32/float16/bfloat16), ``scores``/``counts``/``last`` ``[B, H, C]`` float32 and ``slot_pos``
``[B, H, C]`` int64 (``-1`` = empty slot). ``append``, ``accumulate`` and ``compress`` mutate their
state arguments in place and return nothing; ``decode_attention`` and ``block_attention`` also
update the statistics and return the attention output (written into ``out`` when given). Any
strides are accepted; nothing is copied. Integer arguments accept integer-like numbers
(``operator.index``: ``numpy.int64``, ...) and refuse bools.
"""
from __future__ import annotations

import numbers
import operator

import torch
from torch import Tensor

from . import _loader  # noqa: F401  (registers torch.ops.weightedkv)

from .policies import GROUP_REDUCES, KERNEL_POLICIES as POLICIES  # one table: policies.py
from .prompt import OPTIONS as _PROMPT  # the prompt options' defaults: prompt.py

_ops = torch.ops.weightedkv


def _int(op: str, name: str, value):
    """An integer argument: integer-like numbers (``numpy.int64``, ...) become an int, bools are
    refused like the cache refuses them; anything else goes to the op, whose schema error names
    the argument and its type."""
    if isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be an int, got {name}={value!r} (a bool)")
    return operator.index(value) if hasattr(type(value), "__index__") else value


def _float(op: str, name: str, value):
    """A float argument: real numbers (``numpy.float32``, ...) become a float, bools are
    refused; anything else goes to the op (schema error)."""
    if isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be a float, got {name}={value!r} (a bool)")
    return float(value) if isinstance(value, numbers.Real) else value


def append(keys: Tensor, values: Tensor, scores: Tensor, counts: Tensor, last: Tensor,
           slot_pos: Tensor, new_keys: Tensor, new_values: Tensor, new_pos: Tensor) -> None:
    """Write the non-padding new tokens into the free slots (in place).

    ``new_keys``/``new_values``: ``[B, H, T, D]`` (dtype of ``keys``); ``new_pos``: int64 ``[B, T]``,
    ``-1`` = padding. Per (b, h) the tokens with ``new_pos >= 0`` (increasing t) go to the free
    slots in increasing slot index, with zeroed statistics. Raises if a row lacks free slots
    (the cache is then left unchanged).
    """
    _ops.append(keys, values, scores, counts, last, slot_pos, new_keys, new_values, new_pos)


def accumulate(probs: Tensor, slot_pos: Tensor, query_pos: Tensor, scores: Tensor,
               counts: Tensor, last: Tensor, group_reduce: str = "mean") -> None:
    """Add the attention probabilities ``probs`` ``[B, Hq, Q, C]`` to the statistics (in place).

    ``Hq = G * H`` (query head ``hq`` belongs to KV head ``hq // G``); the G probabilities are
    reduced with ``group_reduce`` (``"mean"``, ``"sum"`` or ``"max"``). ``query_pos`` int64
    ``[B, Q]``: a query sees the held slots with ``slot_pos <= query_pos``; ``-1`` = padding.
    """
    _ops.accumulate(probs, slot_pos, query_pos, scores, counts, last, group_reduce)


def compress(keys: Tensor, values: Tensor, scores: Tensor, counts: Tensor, last: Tensor,
             slot_pos: Tensor, budget: int, sinks: int, recent: int, policy: str,
             cam_window: int = 16, seed: int = 0, head_offset: int = 0, *,
             merge_target: str = "right", merge_gate: float = 0.0,
             merge_weights: str = "average", merged: Tensor | None = None) -> None:
    """Remove tokens of every (b, h) until at most ``budget`` are held (in place).

    ``policy`` is one of ``POLICIES``; the ``sinks`` oldest and ``recent`` newest held tokens are
    never removed (``budget > sinks + recent``). ``cam_window`` and ``seed`` are used by ``"cam"``,
    whose draw for KV head ``h`` is keyed by the global head ``head_offset + h`` (tensor
    parallelism: a shard holding heads ``head_offset ..`` draws what the full run draws).

    ``merge_target`` (``policies.MERGE_TARGETS``), ``merge_gate`` (key cosine in [0, 1], 0 = off)
    and ``merge_weights`` (``policies.MERGE_WEIGHTS``) change weightedkv's merge (their defaults
    are the paper's; csrc/kernels/merge.h). ``merged`` float32 ``[B, H, C]`` or None: the evicted
    tokens each slot has absorbed, updated in place (needed by ``merge_weights="mass"``).
    """
    op = "compress"
    _ops.compress(keys, values, scores, counts, last, slot_pos, _int(op, "budget", budget),
                  _int(op, "sinks", sinks), _int(op, "recent", recent), policy,
                  _int(op, "cam_window", cam_window), _int(op, "seed", seed),
                  _int(op, "head_offset", head_offset), merge_target,
                  _float(op, "merge_gate", merge_gate), merge_weights, merged)


def _attention_kwargs(op: str, window, softcap) -> dict:
    return dict(window=_int(op, "window", window), softcap=_float(op, "softcap", softcap))


def decode_attention(query: Tensor, keys: Tensor, values: Tensor, slot_pos: Tensor,
                     query_pos: Tensor, scores: Tensor, counts: Tensor, last: Tensor,
                     scale: float, group_reduce: str = "mean", *, window: int = 0,
                     softcap: float = 0.0, sinks: Tensor | None = None,
                     out: Tensor | None = None) -> Tensor:
    """Fused single-query attention over the held slots, updating the statistics.

    ``query`` ``[B, Hq, D]`` (dtype of ``keys``), ``query_pos`` int64 ``[B]`` (``-1`` = padding
    row: zero output, no statistics). ``window``, ``softcap``, ``sinks`` as in
    ``block_attention``. Returns ``out`` ``[B, Hq, D]`` in the dtype of ``query`` (the given
    ``out`` if any, written in place).
    """
    op = "decode_attention"
    if out is None:
        # empty_like: a third of the cost of torch.empty(shape, dtype=, device=) per call
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    _ops.decode_attention(query, keys, values, slot_pos, query_pos, scores, counts, last,
                          _float(op, "scale", scale), group_reduce, sinks=sinks, out=out,
                          **_attention_kwargs(op, window, softcap))
    return out


def block_attention(query: Tensor, keys: Tensor, values: Tensor, slot_pos: Tensor,
                    query_pos: Tensor, scores: Tensor, counts: Tensor, last: Tensor,
                    scale: float, group_reduce: str = "mean", *, window: int = 0,
                    softcap: float = 0.0, sinks: Tensor | None = None,
                    out: Tensor | None = None) -> Tensor:
    """Attention of a chunk of ``Q`` queries over the held slots, updating the statistics
    exactly as ``accumulate`` would with these probabilities (which are never stored).

    ``query`` ``[B, Hq, Q, D]`` (dtype of ``keys``), ``query_pos`` int64 ``[B, Q]`` (``-1`` =
    padding query: zero output, no statistics). Query ``q`` sees the held slots with
    ``slot_pos <= query_pos[b, q]`` and, if ``window > 0``, ``query_pos - slot_pos < window``;
    ``softcap > 0``: ``logit = softcap * tanh(logit / softcap)``; ``sinks`` (float32 ``[Hq]``):
    one extra logit per query head in the softmax normaliser (probabilities sum to < 1). A query
    that sees nothing gets zeros. Returns ``out`` ``[B, Hq, Q, D]`` in the dtype of ``query``.
    """
    op = "block_attention"
    if out is None:
        # empty_like: a third of the cost of torch.empty(shape, dtype=, device=) per call
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    _ops.block_attention(query, keys, values, slot_pos, query_pos, scores, counts, last,
                         _float(op, "scale", scale), group_reduce, sinks=sinks, out=out,
                         **_attention_kwargs(op, window, softcap))
    return out


def snap_compress(keys: Tensor, values: Tensor, scores: Tensor, counts: Tensor, last: Tensor,
                  slot_pos: Tensor, budget: int, sinks: int, recent: int,
                  pool: int = _PROMPT["prompt_pool"], merge: bool = _PROMPT["prompt_merge"], *,
                  kept: Tensor | None = None) -> Tensor:
    """The prompt-end step of the ``snapkv`` prompt mode: compress every (b, h) to ``budget``
    held tokens at once (in place), ranked by ``scores`` (the window's attention sums).

    Per (b, h), with the held tokens in position order: the scores averaged over ``pool``
    neighbours (odd, centred, zero outside); the ``sinks`` oldest and ``recent`` newest (the
    observation window) kept; of the others, the ``budget - sinks - recent`` with the highest
    pooled score kept (ties: older first); the rest dropped, or with ``merge`` first merged into
    their kept right neighbour weighted by ``scores / counts``. Returns ``kept`` int64
    ``[B, H, C]``: the held slots in position order, then -1 (the given ``kept`` if any).
    """
    op = "snap_compress"
    if kept is None:
        kept = torch.empty(slot_pos.shape, dtype=torch.int64, device=slot_pos.device)
    if not isinstance(merge, bool):
        raise ValueError(f"{op}: merge must be a bool, got merge={merge!r}")
    _ops.snap_compress(keys, values, scores, counts, last, slot_pos, _int(op, "budget", budget),
                       _int(op, "sinks", sinks), _int(op, "recent", recent),
                       _int(op, "pool", pool), merge, kept=kept)
    return kept


# ---- fake (meta) kernels, for torch.compile / FakeTensor tracing -----------------------------
# A call mixing meta and CPU tensors dispatches here (Meta outranks CPU), so the device check of
# the real kernels is repeated: every tensor argument on one device, else the kernels' error.

def _one_device(op: str, **tensors: Tensor) -> None:
    (first, ref), *rest = tensors.items()
    for name, t in rest:
        torch._check(t.device == ref.device,
                     lambda: f"{op}: all tensors must be on one device, but {first} is on "
                             f"{ref.device} and {name} is on {t.device}")


@torch.library.register_fake("weightedkv::append")
def _append_fake(keys, values, scores, counts, last, slot_pos, new_keys, new_values, new_pos):
    _one_device("append", keys=keys, values=values, scores=scores, counts=counts, last=last,
                slot_pos=slot_pos, new_keys=new_keys, new_values=new_values, new_pos=new_pos)
    return None


@torch.library.register_fake("weightedkv::accumulate")
def _accumulate_fake(probs, slot_pos, query_pos, scores, counts, last, group_reduce="mean"):
    _one_device("accumulate", probs=probs, slot_pos=slot_pos, query_pos=query_pos,
                scores=scores, counts=counts, last=last)
    return None


@torch.library.register_fake("weightedkv::compress")
def _compress_fake(keys, values, scores, counts, last, slot_pos, budget, sinks, recent, policy,
                   cam_window=16, seed=0, head_offset=0, merge_target="right", merge_gate=0.0,
                   merge_weights="average", merged=None):
    tensors = dict(keys=keys, values=values, scores=scores, counts=counts, last=last,
                   slot_pos=slot_pos)
    if merged is not None:
        tensors["merged"] = merged
    _one_device("compress", **tensors)
    return None


def _attention_fake(op, query, keys, values, slot_pos, query_pos, scores, counts, last, sinks,
                    out, rank):
    extra = {} if sinks is None else dict(sinks=sinks)
    _one_device(op, keys=keys, query=query, values=values, slot_pos=slot_pos,
                query_pos=query_pos, scores=scores, counts=counts, last=last, out=out, **extra)
    layout = "[B, Hq, D]" if rank == 3 else "[B, Hq, Q, D]"
    torch._check(query.dim() == rank, lambda: f"{op}: query must be {layout}")
    torch._check(out.shape == query.shape,
                 lambda: f"{op}: out must have shape {layout} (the shape of query)")
    return None


@torch.library.register_fake("weightedkv::decode_attention")
def _decode_attention_fake(query, keys, values, slot_pos, query_pos, scores, counts, last, scale,
                           group_reduce="mean", *, window=0, softcap=0.0, sinks=None, out):
    return _attention_fake("decode_attention", query, keys, values, slot_pos, query_pos, scores,
                           counts, last, sinks, out, 3)


@torch.library.register_fake("weightedkv::block_attention")
def _block_attention_fake(query, keys, values, slot_pos, query_pos, scores, counts, last, scale,
                          group_reduce="mean", *, window=0, softcap=0.0, sinks=None, out):
    return _attention_fake("block_attention", query, keys, values, slot_pos, query_pos, scores,
                           counts, last, sinks, out, 4)


@torch.library.register_fake("weightedkv::snap_compress")
def _snap_compress_fake(keys, values, scores, counts, last, slot_pos, budget, sinks, recent, pool,
                        merge, *, kept):
    _one_device("snap_compress", keys=keys, values=values, scores=scores, counts=counts,
                last=last, slot_pos=slot_pos, kept=kept)
    return None


__all__ = ["POLICIES", "GROUP_REDUCES", "append", "accumulate", "compress", "decode_attention",
           "block_attention", "snap_compress"]
