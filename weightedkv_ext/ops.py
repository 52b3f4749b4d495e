"""Typed Python wrappers of the compiled ops ``torch.ops.weightedkv.*`` (contract: docs/design.md).

All four ops work on the fixed-slot cache of one layer: ``keys``/``values`` ``[B, H, C, D]``
(float32/float16/bfloat16), ``scores``/``counts``/``last`` ``[B, H, C]`` float32 and ``slot_pos``
``[B, H, C]`` int64 (``-1`` = empty slot). ``append``, ``accumulate`` and ``compress`` mutate their
state arguments in place and return nothing; ``decode_attention`` also updates the statistics and
returns the attention output. Any strides are accepted; nothing is copied.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _loader  # noqa: F401  (registers torch.ops.weightedkv)

POLICIES = ("weightedkv", "evict", "h2o", "tova", "streaming", "cam")
GROUP_REDUCES = ("mean", "sum", "max")

_ops = torch.ops.weightedkv


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
             cam_window: int = 16, seed: int = 0) -> None:
    """Remove tokens of every (b, h) until at most ``budget`` are held (in place).

    ``policy`` is one of ``POLICIES``; the ``sinks`` oldest and ``recent`` newest held tokens are
    never removed (``budget > sinks + recent``). ``cam_window`` and ``seed`` are used by ``"cam"``.
    """
    _ops.compress(keys, values, scores, counts, last, slot_pos, budget, sinks, recent, policy,
                  cam_window, seed)


def decode_attention(query: Tensor, keys: Tensor, values: Tensor, slot_pos: Tensor,
                     query_pos: Tensor, scores: Tensor, counts: Tensor, last: Tensor,
                     scale: float, group_reduce: str = "mean") -> Tensor:
    """Fused single-query attention over the held slots, updating the statistics.

    ``query`` ``[B, Hq, D]`` (dtype of ``keys``), ``query_pos`` int64 ``[B]`` (``-1`` = padding
    row: zero output, no statistics). Returns ``out`` ``[B, Hq, D]`` in the dtype of ``query``.
    """
    return _ops.decode_attention(query, keys, values, slot_pos, query_pos, scores, counts, last,
                                 scale, group_reduce)


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
                   cam_window=16, seed=0):
    _one_device("compress", keys=keys, values=values, scores=scores, counts=counts, last=last,
                slot_pos=slot_pos)
    return None


@torch.library.register_fake("weightedkv::decode_attention")
def _decode_attention_fake(query, keys, values, slot_pos, query_pos, scores, counts, last, scale,
                           group_reduce="mean"):
    _one_device("decode_attention", keys=keys, query=query, values=values, slot_pos=slot_pos,
                query_pos=query_pos, scores=scores, counts=counts, last=last)
    torch._check(query.dim() == 3, lambda: "decode_attention: query must be [B, Hq, D]")
    return query.new_empty(query.shape)


__all__ = ["POLICIES", "GROUP_REDUCES", "append", "accumulate", "compress", "decode_attention"]
