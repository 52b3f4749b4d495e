"""Pure-PyTorch reference of the four ops of docs/design.md: slow, obvious, kernel-independent.

Same signatures and in-place semantics as ``torch.ops.weightedkv.*``: ``append``, ``accumulate``
and ``compress`` mutate the state tensors; ``decode_attention`` mutates the statistics and returns
``out``. Everything is written with Python loops over (batch, head) and, inside ``compress``, over
single removals, so that each line can be checked against the contract by eye. Float arithmetic
follows the contract's formulas literally in float32 (one rounding to the K/V dtype at the end),
which is why the CPU kernels match this file bit for bit. This module never imports the compiled
extension; the only thing it shares with the kernels is the documented integer hash of
``csrc/kernels/policy.h`` (CaM's random draw), re-implemented here in Python.

WeightedKV's Algorithm 1 (Yuan et al., ICASSP 2025, arXiv 2503.01330) for one (batch, head) of
one layer, and where each step lives here (``_compress_one``):

1. the cache holds tokens in position order with their keys, values and accumulated attention
   ``a_i`` over ``n_i`` queries: ``held_slots`` gives that order over the fixed slots; ``a``,
   ``n`` are ``scores``, ``counts`` (filled by ``accumulate`` / ``decode_attention``);
2. while the cache holds more than the budget: ``while ... L > budget``;
3. candidates are all tokens but the attention sinks and the recent window:
   ``eligible = order[sinks : L - recent]``;
4. ``j = argmin_i a_i / n_i`` over the candidates: ``min(eligible, key=(avg, position))``, ties to
   the oldest token (the contract's deterministic tie-break);
5. discard ``k_j`` and merge ``v_j`` into its right neighbour ``r``:
   ``v_r <- (avg_j v_j + avg_r v_r) / (avg_j + avg_r)``, ``r`` keeping its key and statistics:
   ``_merge_weightedkv`` (float32, one rounding; the weights first scaled by powers of two so
   that tiny or huge averages neither underflow nor overflow: ``_merge_weights``), then ``_drop``
   frees j's slot.

Fig. 3 of the paper is the toy run of this loop with budget 4, no sinks, no recent window: tokens
v1..v8 arrive one per step and from step 5 on each step removes the lowest-average token, e.g. at
step 5 v2 (avg 0.1) merges into v3 (avg 0.5), giving ``v2/6 + 5 v3/6``.
python_tests/test_reference_fig3.py replays that trace with one-hot values.

The baselines share the loop and differ only in the key and the action (docs/design.md):
``evict`` (average score, drop), ``h2o`` (accumulated score), ``tova`` (last query's attention),
``streaming`` (oldest eligible, drop) and ``cam`` (oldest eligible, CaM's probabilistic merge into
the next ``cam_window`` values).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

POLICIES = ("weightedkv", "evict", "h2o", "tova", "streaming", "cam")
MERGE_TARGETS = ("right", "similar", "nearest")  # weightedkv's merge rule (csrc/kernels/merge.h)
MERGE_WEIGHTS = ("average", "mass")
GROUP_REDUCES = ("mean", "sum", "max")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class State(NamedTuple):
    """The six per-layer cache tensors, in the argument order of the ops (``op(*state, ...)``)."""

    keys: Tensor  # [B, H, C, D]
    values: Tensor  # [B, H, C, D]
    scores: Tensor  # [B, H, C] float32
    counts: Tensor  # [B, H, C] float32
    last: Tensor  # [B, H, C] float32
    slot_pos: Tensor  # [B, H, C] int64, -1 = empty


class Held(NamedTuple):
    """The held tokens of one (b, h), in position order (see ``held_in_order``)."""

    positions: Tensor  # [L] int64, increasing
    keys: Tensor  # [L, D]
    values: Tensor  # [L, D]
    scores: Tensor  # [L]
    counts: Tensor  # [L]


def new_state(B: int, H: int, C: int, D: int, dtype=torch.float32, device="cpu") -> State:
    """Empty cache: zero tensors and every slot free (``slot_pos == -1``)."""
    kv = dict(dtype=dtype, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    return State(
        torch.zeros(B, H, C, D, **kv),
        torch.zeros(B, H, C, D, **kv),
        torch.zeros(B, H, C, **f32),
        torch.zeros(B, H, C, **f32),
        torch.zeros(B, H, C, **f32),
        torch.full((B, H, C), -1, dtype=torch.int64, device=device),
    )


def held_slots(slot_pos: Tensor, b: int, h: int) -> list[int]:
    """Slot indices of the held tokens of (b, h), sorted by position."""
    row = slot_pos[b, h].tolist()
    return sorted((c for c, p in enumerate(row) if p >= 0), key=lambda c: row[c])


def held_in_order(state, b: int, h: int) -> Held:
    """(positions, keys, values, scores, counts) of the held tokens of (b, h), in position order."""
    keys, values, scores, counts, _, slot_pos = state
    idx = torch.tensor(held_slots(slot_pos, b, h), dtype=torch.long, device=slot_pos.device)
    return Held(slot_pos[b, h, idx], keys[b, h, idx], values[b, h, idx], scores[b, h, idx],
                counts[b, h, idx])


# ----------------------------------------------------------------------------------------------
# validation (messages name the op, the argument and the bad value, like the kernels')


def _fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def _check(op, name, t, layout, shape=None, dtypes=None, device=None):
    """Rank (from `layout`, e.g. "[B, H, C]"), shape, dtype and device of one tensor argument."""
    rank = layout.count(",") + 1
    if t.dim() != rank:
        _fail(op, f"{name} must be a {rank}-D tensor {layout}, got shape {list(t.shape)}")
    if shape is not None and list(t.shape) != list(shape):
        _fail(op, f"{name} must have shape {layout} = {list(shape)}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(op, f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if device is not None and t.device != device:
        _fail(op, f"all tensors must be on one device, but {name} is on {t.device}, not {device}")


def _check_stats(op, B, H, C, scores, counts, last, slot_pos, device):
    for name, t in (("scores", scores), ("counts", counts), ("last", last)):
        _check(op, name, t, "[B, H, C]", (B, H, C), (torch.float32,), device)
    _check(op, "slot_pos", slot_pos, "[B, H, C]", (B, H, C), (torch.int64,), device)


def _check_state(op, keys, values, scores, counts, last, slot_pos):
    """The six cache tensors; returns (B, H, C, D)."""
    _check(op, "keys", keys, "[B, H, C, D]", dtypes=FLOAT_DTYPES)
    B, H, C, D = keys.shape
    _check(op, "values", values, "[B, H, C, D]", keys.shape, (keys.dtype,), keys.device)
    _check_stats(op, B, H, C, scores, counts, last, slot_pos, keys.device)
    return B, H, C, D


def _check_group(op, hq, h, group_reduce):
    if h <= 0 or hq <= 0 or hq % h != 0:
        _fail(op, f"the number of query heads Hq must be a positive multiple of the number of KV "
                  f"heads H, got Hq={hq}, H={h}")
    if group_reduce not in GROUP_REDUCES:
        _fail(op, f"group_reduce must be one of {GROUP_REDUCES}, got {group_reduce!r}")


# ----------------------------------------------------------------------------------------------
# append


def append(keys, values, scores, counts, last, slot_pos, new_keys, new_values, new_pos) -> None:
    """Write the non-padding new tokens, in order, into the free slots, in increasing slot index."""
    op = "append"
    B, H, C, D = _check_state(op, keys, values, scores, counts, last, slot_pos)
    _check(op, "new_keys", new_keys, "[B, H, T, D]")
    T = new_keys.shape[2]
    for name, t in (("new_keys", new_keys), ("new_values", new_values)):
        _check(op, name, t, "[B, H, T, D]", (B, H, T, D), (keys.dtype,), keys.device)
    _check(op, "new_pos", new_pos, "[B, T]", (B, T), (torch.int64,), keys.device)

    # Check every row before writing anything.
    for b in range(B):
        tokens = [t for t in range(T) if new_pos[b, t] >= 0]
        for h in range(H):
            free = [c for c in range(C) if slot_pos[b, h, c] == -1]
            if len(free) < len(tokens):
                _fail(op, f"not enough free slots: batch {b}, head {h} has {len(free)} free slots "
                          f"for {len(tokens)} new tokens")
    for b in range(B):
        tokens = [t for t in range(T) if new_pos[b, t] >= 0]
        for h in range(H):
            free = [c for c in range(C) if slot_pos[b, h, c] == -1]
            for t, c in zip(tokens, free):
                keys[b, h, c] = new_keys[b, h, t]
                values[b, h, c] = new_values[b, h, t]
                scores[b, h, c] = 0
                counts[b, h, c] = 0
                last[b, h, c] = 0
                slot_pos[b, h, c] = new_pos[b, t]


# ----------------------------------------------------------------------------------------------
# accumulate


def _reduce_groups(p: Tensor, group_reduce: str) -> Tensor:
    """p: [G, ...] float32 -> [...]; sum/max in group order, mean = sum / G."""
    acc = p[0].clone()
    for g in range(1, p.shape[0]):
        acc = torch.maximum(acc, p[g]) if group_reduce == "max" else acc + p[g]
    return acc / p.shape[0] if group_reduce == "mean" else acc


def accumulate(probs, slot_pos, query_pos, scores, counts, last, group_reduce="mean") -> None:
    """Add the attention received by each held slot from the queries that can see it."""
    op = "accumulate"
    _check(op, "probs", probs, "[B, Hq, Q, C]", dtypes=FLOAT_DTYPES)
    _check(op, "slot_pos", slot_pos, "[B, H, C]")
    B, H, C = slot_pos.shape
    _, Hq, Q, _ = probs.shape
    if probs.shape[0] != B or probs.shape[3] != C:
        _fail(op, f"probs must have shape [B, Hq, Q, C] with B = {B} and C = {C} "
                  f"(from slot_pos), got {list(probs.shape)}")
    _check_stats(op, B, H, C, scores, counts, last, slot_pos, probs.device)
    _check(op, "query_pos", query_pos, "[B, Q]", (B, Q), (torch.int64,), probs.device)
    _check_group(op, Hq, H, group_reduce)
    G = Hq // H

    for b in range(B):
        qpos = query_pos[b].tolist()
        valid = [q for q in range(Q) if qpos[q] >= 0]
        for h in range(H):
            p = _reduce_groups(probs[b, h * G:(h + 1) * G].float(), group_reduce)  # [Q, C]
            held = slot_pos[b, h] >= 0
            sees = [held & (slot_pos[b, h] <= qpos[q]) for q in range(Q)]
            total = torch.zeros(C, dtype=torch.float32, device=probs.device)
            seen = torch.zeros(C, dtype=torch.float32, device=probs.device)
            for q in valid:  # query order
                total = total + torch.where(sees[q], p[q], 0.0)
                seen = seen + sees[q].float()
            scores[b, h] = torch.where(held, scores[b, h] + total, scores[b, h])
            counts[b, h] = torch.where(held, counts[b, h] + seen, counts[b, h])
            if valid:
                q_star = valid[-1]
                new_last = torch.where(sees[q_star], p[q_star], 0.0)
                last[b, h] = torch.where(held, new_last, last[b, h])


# ----------------------------------------------------------------------------------------------
# attention: decode_attention (one query per row) and block_attention (a chunk of Q queries)


def _check_features(op, Hq, device, window, softcap, sinks):
    """window >= 0 (0 = off), softcap >= 0 and not NaN (0 = off), sinks None or float32 [Hq]."""
    if isinstance(window, bool) or not isinstance(window, int):
        _fail(op, f"window must be an int, got window={window!r}")
    if window < 0:
        _fail(op, f"window must be >= 0 (0 = no sliding window), got window={window}")
    if isinstance(softcap, int) and not isinstance(softcap, bool):
        softcap = float(softcap)
    if not isinstance(softcap, float) or not softcap >= 0 or math.isinf(softcap):
        _fail(op, f"softcap must be a finite float >= 0 (0 = no soft-capping), got "
                  f"softcap={softcap!r}")
    if sinks is not None:
        _check(op, "sinks", sinks, "[Hq]", (Hq,), (torch.float32,), device)


def _visible(slot_pos_bh: Tensor, qp: int, window: int) -> Tensor:
    """Held slots the query at position qp sees: slot_pos <= qp and, with a window, qp - slot_pos
    < window (transformers' sliding window: kv_idx > q_idx - sliding_window)."""
    vis = (slot_pos_bh >= 0) & (slot_pos_bh <= qp)
    if window > 0:
        vis = vis & (qp - slot_pos_bh < window)
    return vis


def _attend(q, k, v, visible, scale, softcap, sink):
    """Softmax attention of one query over the visible rows of k, v, in float32.

    logits = scale * k q; with softcap c > 0: c * tanh(logits / c); with a sink s (GPT-OSS
    s_aux): one extra logit in the normaliser only, so the probabilities sum to less than 1.
    Returns (p [C], 0 outside `visible`; out [D])."""
    logits = (k.float() @ q.float()) * scale
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~visible, float("-inf"))
    if sink is None:
        p = torch.softmax(logits, dim=0)
    else:
        p = torch.softmax(torch.cat([logits, sink.float().reshape(1)]), dim=0)[:-1]
    return p, p @ v.float()


def _attention(op, query, keys, values, slot_pos, query_pos, scores, counts, last, scale,
               group_reduce, window, softcap, sinks):
    """block_attention on query [B, Hq, Q, D], query_pos [B, Q]; returns the float32 output."""
    B, H, C, D = _check_state(op, keys, values, scores, counts, last, slot_pos)
    Hq, Q = query.shape[1], query.shape[2]
    _check(op, "query", query, "[B, Hq, Q, D]", (B, Hq, Q, D), (keys.dtype,), keys.device)
    _check(op, "query_pos", query_pos, "[B, Q]", (B, Q), (torch.int64,), keys.device)
    _check_group(op, Hq, H, group_reduce)
    _check_features(op, Hq, keys.device, window, softcap, sinks)
    G = Hq // H

    res = torch.zeros(B, Hq, Q, D, dtype=torch.float32, device=query.device)
    probs = torch.zeros(B, Hq, Q, C, dtype=torch.float32, device=query.device)
    for b in range(B):
        for q in range(Q):
            qp = int(query_pos[b, q])
            if qp < 0:  # padding query: zero output, no statistics
                continue
            for hq in range(Hq):
                h = hq // G
                visible = _visible(slot_pos[b, h], qp, window)
                if not bool(visible.any()):  # sees nothing: zero output and probabilities
                    continue
                sink = None if sinks is None else sinks[hq]
                probs[b, hq, q], res[b, hq, q] = _attend(query[b, hq, q], keys[b, h],
                                                         values[b, h], visible, scale, softcap,
                                                         sink)
    # the statistics are exactly accumulate's with these probabilities
    accumulate(probs, slot_pos, query_pos, scores, counts, last, group_reduce)
    return res


def decode_attention(query, keys, values, slot_pos, query_pos, scores, counts, last, scale,
                     group_reduce="mean", *, window=0, softcap=0.0, sinks=None,
                     out=None) -> Tensor:
    """Single-query attention over the visible held slots; statistics as ``accumulate`` with Q = 1.

    A padding row (``query_pos == -1``) gets ``out = 0`` and no statistics. A valid row that sees
    no slot at all also gets ``out = 0`` (all its probabilities are 0). ``window``, ``softcap`` and
    ``sinks`` as in ``block_attention``; ``out`` (optional, ``[B, Hq, D]``, dtype of query) is
    written and returned.
    """
    op = "decode_attention"
    B, H, C, D = _check_state(op, keys, values, scores, counts, last, slot_pos)
    _check(op, "query", query, "[B, Hq, D]")
    _check(op, "query", query, "[B, Hq, D]", (B, query.shape[1], D), (keys.dtype,), keys.device)
    _check(op, "query_pos", query_pos, "[B]", (B,), (torch.int64,), keys.device)
    if out is not None:
        _check(op, "out", out, "[B, Hq, D]", query.shape, (query.dtype,), query.device)
    res = _attention(op, query[:, :, None], keys, values, slot_pos, query_pos[:, None], scores,
                     counts, last, scale, group_reduce, window, softcap, sinks)[:, :, 0]
    if out is None:
        return res.to(query.dtype)
    _store(out, res)
    return out


def block_attention(query, keys, values, slot_pos, query_pos, scores, counts, last, scale,
                    group_reduce="mean", *, window=0, softcap=0.0, sinks=None,
                    out=None) -> Tensor:
    """Attention of a chunk of queries ``[B, Hq, Q, D]`` (positions ``[B, Q]``, -1 = padding) over
    the held slots, updating the statistics exactly as ``accumulate`` with these probabilities.

    Query ``q`` sees the held slots with ``slot_pos <= query_pos[b, q]`` and, if ``window > 0``,
    ``query_pos - slot_pos < window``; ``softcap > 0``: ``logit = softcap * tanh(logit /
    softcap)``; ``sinks`` (float32 ``[Hq]``): one extra logit per query head in the normaliser.
    A query that sees nothing (padding or nothing visible) gets zeros. Returns ``out``
    ``[B, Hq, Q, D]`` in the query dtype (the given ``out`` if any, written in place).
    """
    op = "block_attention"
    B, H, C, D = _check_state(op, keys, values, scores, counts, last, slot_pos)
    _check(op, "query", query, "[B, Hq, Q, D]")
    _check(op, "query", query, "[B, Hq, Q, D]", (B, *query.shape[1:3], D), (keys.dtype,),
           keys.device)
    if out is not None:
        _check(op, "out", out, "[B, Hq, Q, D]", query.shape, (query.dtype,), query.device)
    res = _attention(op, query, keys, values, slot_pos, query_pos, scores, counts, last, scale,
                     group_reduce, window, softcap, sinks)
    if out is None:
        return res.to(query.dtype)
    _store(out, res)
    return out


# ----------------------------------------------------------------------------------------------
# compress

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """splitmix64 finaliser (Steele et al. 2014), arithmetic mod 2^64."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def uniform(seed: int, b: int, h: int, pos: int) -> float:
    """CaM's draw in [0, 1): the counter-based hash documented in csrc/kernels/policy.h.

    x = sm(seed); x = sm(x ^ b); x = sm(x ^ h); x = sm(x ^ pos); u = (x >> 40) / 2^24, with the
    integers taken as two's-complement uint64. u has 24 bits, so it is exact in float32.
    """
    x = _splitmix64(seed & _M64)
    for v in (b, h, pos):
        x = _splitmix64(x ^ (v & _M64))
    return (x >> 40) / float(1 << 24)


def _avg(scores_bh: Tensor, counts_bh: Tensor) -> Tensor:
    """avg_i = a_i / n_i in float32, 0 where n_i == 0."""
    return torch.where(counts_bh == 0, torch.zeros_like(scores_bh), scores_bh / counts_bh)


def _store(dst: Tensor, x: Tensor) -> None:
    dst.copy_(x.to(dst.dtype))  # the single rounding to the K/V dtype


def _f32(x: float) -> Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _sum(w: list[Tensor]) -> Tensor:
    s = _f32(0.0)
    for x in w:
        s = s + x
    return s


def _scale_weights(w: list[Tensor], equal: float) -> tuple[list[Tensor], Tensor]:
    """The weights of an n-way merge and their sum s (docs/design.md, compress step 3), float32
    scalars summed in list order: all ``equal`` (s = n * equal) unless s is a positive finite
    float32; non-negative weights scaled by powers of two until s lies in [1/2, 1)."""
    s = _sum(w)
    if not (math.isfinite(float(s)) and float(s) > 0):  # 0, negative, inf, NaN
        return [_f32(equal)] * len(w), _f32(equal * len(w))
    if all(float(x) >= 0 for x in w) and not 0.5 <= float(s) < 1.0:
        if float(s) < 2.0 ** -126 or float(s) >= 2.0 ** 64:  # first 2^64 / 2^-64
            g = _f32(2.0 ** 64 if float(s) < 2.0 ** -126 else 2.0 ** -64)
            w = [x * g for x in w]
            s = _sum(w)
        _, e = math.frexp(float(s))  # s = m 2^e, m in [1/2, 1): 2^-e puts s there
        f = _f32(2.0 ** -e)
        w = [x * f for x in w]
        s = _sum(w)
    return w, s


def _merge_weights(wj: Tensor, wr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The weights (w_j, w_r) and their sum s of a WeightedKV merge: ``_scale_weights``, equal
    weights 1/2 (s = 1)."""
    (wj, wr), s = _scale_weights([wj, wr], 0.5)
    return wj, wr, s


def _merge_weightedkv(values_bh: Tensor, avg: Tensor, j: int, r: int, weight=None) -> None:
    """v_r <- (w_j v_j + w_r v_r) / s with the weights of ``_merge_weights``, float32.
    ``weight`` [C] float32: the per-slot weights (default ``avg``: the paper's)."""
    weight = avg if weight is None else weight
    vj, vr = values_bh[j].float(), values_bh[r].float()
    wj, wr, s = _merge_weights(weight[j].float(), weight[r].float())
    _store(values_bh[r], (wj * vj + wr * vr) / s)


def _cosines(keys_bh: Tensor, j: int, others: list[int]) -> Tensor:
    """cos(k_j, k_c) for c in ``others`` [n] float32, as merge.h's key_cosine: dot, |k_j|^2 and
    |k_c|^2 summed in increasing d, then dot / (sqrt |k_j|^2 * sqrt |k_c|^2), 0 unless > 0."""
    a = keys_bh[j].float()
    b = keys_bh[others].float()
    dot = torch.zeros(len(others), dtype=torch.float32, device=a.device)
    nb = torch.zeros_like(dot)
    na = torch.zeros((), dtype=torch.float32, device=a.device)
    for d in range(a.shape[0]):
        dot = dot + b[:, d] * a[d]
        na = na + a[d] * a[d]
        nb = nb + b[:, d] * b[:, d]
    den = torch.sqrt(na) * torch.sqrt(nb)
    return torch.where(den > 0, dot / den, torch.zeros_like(dot))


def _merge_target(keys_bh: Tensor, order: list[int], pos: list[int], j: int,
                  merge_target: str) -> tuple[int | None, float | None]:
    """weightedkv's target for j among the held tokens ``order`` (position order) and its key
    cosine (None when not computed): right neighbour / more similar neighbour / most similar."""
    i = order.index(j)
    right = order[i + 1] if i + 1 < len(order) else None
    if merge_target == "right":
        return right, None
    if merge_target == "similar":
        left = order[i - 1] if i > 0 else None
        if left is None or right is None:
            return (right if left is None else left), None
        cl, cr = (float(c) for c in _cosines(keys_bh, j, [left, right]))
        take_left = (cl == cl) if cr != cr else cl > cr  # ties and NaN go right
        return (left, cl) if take_left else (right, cr)
    others = [c for c in order if c != j]  # nearest: largest cosine, NaN lowest, then oldest
    if not others:
        return None, None
    cos = _cosines(keys_bh, j, others).tolist()
    best = min(range(len(others)),
               key=lambda k: (1, 0.0, pos[others[k]], others[k]) if cos[k] != cos[k]
               else (0, -cos[k], pos[others[k]], others[k]))
    return others[best], cos[best]


def _cam_probability(avg: Tensor, j: int, window: list[int]) -> float:
    """p = clamp(avg_j / mean_{i in R} avg_i, 0, 1) with the contract's special cases."""
    total = torch.zeros((), dtype=torch.float32, device=avg.device)
    for i in window:  # position order
        total = total + avg[i]
    mean = total / len(window)
    aj = avg[j]
    if bool(torch.isnan(aj)) or bool(torch.isnan(mean)) or bool(aj == 0):
        return 0.0
    if bool(mean == 0):
        return 1.0 if bool(aj > 0) else 0.0
    ratio = aj / mean
    if bool(torch.isnan(ratio)):
        return 0.0
    return float(ratio.clamp(0, 1))


def _merge_cam(values_bh: Tensor, avg: Tensor, j: int, window: list[int], u: float) -> None:
    """If u < p: v_i <- v_i + v_j / m for the m tokens of the window (float32, one rounding)."""
    if u < _cam_probability(avg, j, window):
        share = values_bh[j].float() / len(window)
        for i in window:
            _store(values_bh[i], values_bh[i].float() + share)


def _order(key: float, pos: int) -> tuple:
    """(key, position) lexicographic order; a NaN key counts as the lowest (like torch.argmin)."""
    return (0, 0.0, pos) if key != key else (1, key, pos)


def _drop(scores_bh, counts_bh, last_bh, slot_pos_bh, j: int, merged_bh=None) -> None:
    slot_pos_bh[j] = -1
    scores_bh[j] = 0
    counts_bh[j] = 0
    last_bh[j] = 0
    if merged_bh is not None:
        merged_bh[j] = 0


def _merge_rule(keys_bh, values_bh, avg, order, pos, j, merged_bh, merge_target, merge_gate,
                merge_weights) -> None:
    """weightedkv's merge of j under the merge-rule options (csrc/kernels/merge.h)."""
    t, cos = _merge_target(keys_bh, order, pos, j, merge_target)
    if t is None:
        return
    if merge_gate > 0:
        if cos is None:
            cos = float(_cosines(keys_bh, j, [t])[0])
        if not cos >= _f32(merge_gate).item():  # NaN never passes
            return
    m = merged_bh if merged_bh is not None else torch.zeros_like(avg)
    weight = avg * (1 + m) if merge_weights == "mass" else avg
    _merge_weightedkv(values_bh, avg, j, t, weight)
    if merged_bh is not None:
        merged_bh[t] = merged_bh[t] + (1 + merged_bh[j])


def _compress_one(values_bh, scores_bh, counts_bh, last_bh, slot_pos_bh, b, h, budget, sinks,
                  recent, policy, cam_window, seed, keys_bh=None, merged_bh=None,
                  merge_target="right", merge_gate=0.0, merge_weights="average") -> None:
    """Algorithm 1 for one (batch, head): remove one token at a time until the budget holds.
    ``h`` is the global KV head index (CaM's draw)."""
    paper = (merge_target, merge_gate, merge_weights) == ("right", 0.0, "average")
    while True:
        pos = slot_pos_bh.tolist()
        order = sorted((c for c in range(len(pos)) if pos[c] >= 0), key=lambda c: pos[c])
        L = len(order)
        if L <= budget:
            return
        eligible = order[sinks:L - recent]  # ranks among held tokens; never empty (budget > s + r)
        avg = _avg(scores_bh, counts_bh)
        if policy in ("weightedkv", "evict"):
            key = avg.tolist()
        elif policy == "h2o":
            key = scores_bh.tolist()
        elif policy == "tova":
            key = last_bh.tolist()
        else:  # streaming, cam: the oldest eligible token
            key = pos
        j = min(eligible, key=lambda c: _order(key[c], pos[c]))
        after = order[order.index(j) + 1:]  # held tokens to the right of j, in position order
        if policy == "weightedkv" and not paper:
            _merge_rule(keys_bh, values_bh, avg, order, pos, j, merged_bh, merge_target,
                        merge_gate, merge_weights)
        elif policy == "weightedkv" and after:
            _merge_weightedkv(values_bh, avg, j, after[0])
            if merged_bh is not None:
                merged_bh[after[0]] = merged_bh[after[0]] + (1 + merged_bh[j])
        elif policy == "cam" and after:
            _merge_cam(values_bh, avg, j, after[:cam_window], uniform(seed, b, h, pos[j]))
        _drop(scores_bh, counts_bh, last_bh, slot_pos_bh, j, merged_bh)


def _check_budget(op, budget, sinks, recent, recent_note=""):
    if sinks < 0:
        _fail(op, f"sinks must be >= 0, got sinks={sinks}")
    if recent < 0:
        _fail(op, f"recent must be >= 0{recent_note}, got recent={recent}")
    if budget <= sinks + recent:
        _fail(op, f"budget must exceed sinks + recent, got budget={budget}, sinks={sinks}, "
                  f"recent={recent}")


def compress(keys, values, scores, counts, last, slot_pos, budget, sinks, recent, policy,
             cam_window=16, seed=0, head_offset=0, *, merge_target="right", merge_gate=0.0,
             merge_weights="average", merged=None) -> None:
    """Remove tokens of every (b, h) until at most ``budget`` are held (docs/design.md).
    CaM's draw for KV head ``h`` uses the global head index ``head_offset + h``. The merge-rule
    options and ``merged`` (float32 [B, H, C], updated in place) as in ``ops.compress``."""
    op = "compress"
    _check_state(op, keys, values, scores, counts, last, slot_pos)
    _check_budget(op, budget, sinks, recent)
    if cam_window < 1:
        _fail(op, f"cam_window must be >= 1, got cam_window={cam_window}")
    if head_offset < 0:
        _fail(op, f"head_offset must be >= 0 (the global index of this shard's first KV head), "
                  f"got head_offset={head_offset}")
    if policy not in POLICIES:
        _fail(op, f"policy must be one of {POLICIES}, got {policy!r}")
    if merge_target not in MERGE_TARGETS:
        _fail(op, f"merge_target must be one of {MERGE_TARGETS}, got {merge_target!r}")
    if merge_weights not in MERGE_WEIGHTS:
        _fail(op, f"merge_weights must be one of {MERGE_WEIGHTS}, got {merge_weights!r}")
    if not 0 <= merge_gate <= 1:
        _fail(op, f"merge_gate must be a key cosine in [0, 1] (0 = no gate), got {merge_gate}")
    if (merge_target, merge_gate, merge_weights) != ("right", 0.0, "average") \
            and policy != "weightedkv":
        _fail(op, f"merge_target, merge_gate, merge_weights apply only to policy='weightedkv', "
                  f"got policy={policy!r}")
    if merge_weights == "mass" and merged is None:
        _fail(op, "merge_weights='mass' needs the merged tensor; pass merged=")
    if merged is not None:
        _check(op, "merged", merged, "[B, H, C]", tuple(slot_pos.shape), (torch.float32,),
               keys.device)
    B, H = keys.shape[:2]
    for b in range(B):
        for h in range(H):
            _compress_one(values[b, h], scores[b, h], counts[b, h], last[b, h], slot_pos[b, h],
                          b, head_offset + h, budget, sinks, recent, policy, cam_window, seed,
                          keys[b, h], None if merged is None else merged[b, h], merge_target,
                          float(merge_gate), merge_weights)


# ----------------------------------------------------------------------------------------------
# snap_compress: the prompt-end step of the "snapkv" prompt mode (docs/design.md)


def _snap_pooled(window: Tensor, pool: int) -> Tensor:
    """Average of the window-score sums over ``pool`` centred neighbours (zero outside), float32,
    summed in increasing rank order."""
    half, L = pool // 2, window.shape[0]
    padded = torch.cat([window.new_zeros(half), window, window.new_zeros(half)])
    acc = window.new_zeros(L)
    for i in range(pool):
        acc = acc + padded[i:i + L]
    return acc / torch.tensor(float(pool), dtype=torch.float32)


def _snap_merge(values_bh: Tensor, avg: Tensor, run: list[int], r: int) -> None:
    """v_r <- (sum_k w_k v_k) / (sum_k w_k), k over r then the dropped run right to left, the
    weights of ``_scale_weights`` (equal weights 1)."""
    slots = [r] + run[::-1]
    w, s = _scale_weights([avg[k].float().reshape(()) for k in slots], 1.0)
    acc = torch.zeros(values_bh.shape[1], dtype=torch.float32, device=values_bh.device)
    for x, k in zip(w, slots):
        acc = acc + x * values_bh[k].float()
    _store(values_bh[r], acc / s)


def snap_compress(keys, values, scores, counts, last, slot_pos, budget, sinks, recent, pool=15,
                  merge=False, *, kept=None) -> Tensor:
    """Compress every (b, h) to ``budget`` at once by the pooled ``scores`` (docs/design.md,
    snap_compress); returns ``kept`` [B, H, C] (held slots in position order, then -1)."""
    op = "snap_compress"
    _check_state(op, keys, values, scores, counts, last, slot_pos)
    _check_budget(op, budget, sinks, recent, " (the observation window kept)")
    if pool < 1 or pool % 2 == 0:
        _fail(op, f"pool must be an odd int >= 1 (the pooling kernel, centred; 1 = no pooling), "
                  f"got pool={pool}")
    B, H, C = slot_pos.shape
    if kept is None:
        kept = torch.empty(B, H, C, dtype=torch.int64, device=slot_pos.device)
    kept.fill_(-1)
    for b in range(B):
        for h in range(H):
            pos = slot_pos[b, h].tolist()
            order = sorted((c for c in range(C) if pos[c] >= 0), key=lambda c: (pos[c], c))
            L = len(order)
            keep = [True] * L
            if L > budget:
                idx = torch.tensor(order, dtype=torch.long, device=slot_pos.device)
                pooled = _snap_pooled(scores[b, h, idx].float(), pool).tolist()
                key = [float("-inf") if x != x else x for x in pooled]
                eligible = sorted(range(sinks, L - recent), key=lambda k: (-key[k], k))
                for k in eligible[budget - sinks - recent:]:
                    keep[k] = False
                if merge:
                    avg = _avg(scores[b, h], counts[b, h])
                    run = []
                    for k in range(L):
                        if not keep[k]:
                            run.append(order[k])
                        elif run:
                            _snap_merge(values[b, h], avg, run, order[k])
                            run = []
                for k in range(L):
                    if not keep[k]:
                        _drop(scores[b, h], counts[b, h], last[b, h], slot_pos[b, h], order[k])
            held = [order[k] for k in range(L) if keep[k]]
            if held:
                kept[b, h, :len(held)] = torch.tensor(held, dtype=torch.int64)
    return kept
