"""The ``weightedkv`` attention implementation for transformers (AttentionInterface + mask).

Plumbing (no process-wide state):

* ``WeightedKVCache.update()`` returns the new keys tagged with their cache layer
  (``key._wkv_layer``); the attention function below reads that tag.
* ``create_causal_mask`` calls the registered mask function ``weightedkv_mask`` with the 2-D
  ``attention_mask`` (padding, e.g. generate()'s left padding); it returns a ``WeightedKVMask``
  carrying which new tokens are real, per batch row. Causality is applied per slot from
  ``slot_pos``, so no ``[queries x keys]`` mask is built.
* Per chunk of ``chunk_size`` new tokens: ``append`` -> attention of the chunk's queries over the
  slots (fused ``decode_attention`` for one query, else one float32 ``chunk x slots`` block and
  ``accumulate``) -> ``compress`` to the budget. With padding, chunks are cut per row over its
  real tokens only (``_row_chunks``), so each row is chunked as if it ran alone.
* Untagged keys (another cache, or no cache) fall back to transformers' ``sdpa`` attention.
"""
from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface, PreTrainedModel

NAME = "weightedkv"


class WeightedKVMask:
    """What the ``weightedkv`` mask function hands to the attention function.

    ``real``: bool ``[B, Q]`` (True = real token, False = padding) for the new tokens, or None when
    every token is real. ``sdpa()`` builds the ordinary sdpa mask, for the fallback path only.
    """

    __slots__ = ("real", "_sdpa_kwargs", "_sdpa_mask")

    def __init__(self, real: torch.Tensor | None, sdpa_kwargs: dict):
        self.real = real
        self._sdpa_kwargs = sdpa_kwargs
        self._sdpa_mask = None

    def sdpa(self) -> torch.Tensor | None:
        if self._sdpa_kwargs is not None:
            self._sdpa_mask = sdpa_mask(**self._sdpa_kwargs)
            self._sdpa_kwargs = None
        return self._sdpa_mask

    def __repr__(self):
        shape = None if self.real is None else tuple(self.real.shape)
        return f"WeightedKVMask(real={shape})"


def weightedkv_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                    kv_offset: int = 0, attention_mask: torch.Tensor | None = None,
                    **kwargs) -> WeightedKVMask:
    """Mask function registered under ``weightedkv`` (signature of transformers' ``sdpa_mask``)."""
    real = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size \
                or attention_mask.shape[1] < q_length:
            raise ValueError(
                f"weightedkv attention: attention_mask must be 2-D [batch={batch_size}, >= "
                f"{q_length} new tokens], got shape {tuple(attention_mask.shape)}")
        real = attention_mask[:, -q_length:].to(torch.bool)
        if bool(real.all()):
            real = None
    sdpa_kwargs = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                       q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask,
                       **kwargs)
    return WeightedKVMask(real, sdpa_kwargs)


def _block_attention(ops, layer, query, query_pos, scaling):
    """Attention of ``Q`` queries over all slots: one float32 ``[G*Q, C]`` block per (b, KV head).

    query ``[B, Hq, Q, D]``, query_pos int64 ``[B, Q]`` -> out ``[B, Hq, Q, D]`` (query dtype).
    Query heads ``h*G .. h*G+G-1`` share KV head ``h`` (transformers' repeat_kv order), so the
    queries are reshaped to ``[B, H, G*Q, D]`` instead of repeating K/V.
    """
    keys, values, scores, counts, last, slot_pos = layer.state
    B, Hq, Q, D = query.shape
    H, C = keys.shape[1], keys.shape[2]
    G = Hq // H
    q = query.reshape(B, H, G * Q, D).float()
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).mul_(scaling)  # [B, H, G*Q, C]
    slots = slot_pos[:, :, None, :]  # [B, H, 1, C]
    visible = (slots >= 0) & (slots <= query_pos[:, None, :, None])  # [B, H, Q, C]
    logits.view(B, H, G, Q, C).masked_fill_(~visible[:, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # A query that sees no slot (padding) gets all-zero probabilities instead of NaN.
    sees_any = visible.any(-1)  # [B, H, Q]
    probs.view(B, H, G, Q, C).masked_fill_(~sees_any[:, :, None, :, None], 0.0)
    layer.peak_block = max(layer.peak_block, Q * C)
    out = torch.matmul(probs, values.float())  # [B, H, G*Q, D]
    ops.accumulate(probs.view(B, Hq, Q, C), slot_pos, query_pos, scores, counts, last,
                   layer.cache.group_reduce)
    return out.view(B, Hq, Q, D).to(query.dtype)


def _positions(layer, real: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """Absolute positions (among each row's real tokens) of the new tokens; -1 for padding."""
    if real is None:
        pos = layer.row_seen[:, None] + torch.arange(T, device=device)[None, :]
        layer.row_seen += T
        return pos
    real = real.to(device)
    pos = layer.row_seen[:, None] + real.long().cumsum(1) - 1
    layer.row_seen += real.long().sum(1)
    return pos.masked_fill(~real, -1)


def _row_chunks(real: torch.Tensor, pos: torch.Tensor, S: int):
    """Chunks of a padded call: yields ``(cols, qpos)``, int64 ``[B, w]`` each, ``w <= S``.

    Chunk ``k`` holds, for every row ``b``, the columns of row ``b``'s real tokens with in-call
    real index ``k*S .. k*S+S-1`` (any padding pattern), so a row is chunked exactly as the same
    sequence run alone. A row with fewer real tokens is filled with its padding columns, whose
    ``qpos`` (``pos`` gathered) is -1: never appended, never attended, no statistics.
    ``real`` bool ``[B, T]``; ``pos`` int64 ``[B, T]`` from ``_positions`` (-1 at padding).
    """
    # Per row: the columns of its real tokens in order, then its padding columns.
    order = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)
    n_real = int(real.sum(1).max())
    for s in range(0, n_real, S):
        cols = order[:, s:min(n_real, s + S)]
        yield cols, pos.gather(1, cols)


def _gather_tokens(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x[b, :, cols[b, i]]``: ``x`` ``[B, H, T, D]``, ``cols`` ``[B, w]`` -> ``[B, H, w, D]``."""
    B, H, _, D = x.shape
    return x.gather(2, cols[:, None, :, None].expand(B, H, cols.shape[1], D))


def _chunk(layer, query, key, value, qpos, scaling):
    """One chunk: append -> attention of its queries over the slots -> compress to the budget.

    query ``[B, Hq, w, D]``, key/value ``[B, H, w, D]``, qpos int64 ``[B, w]`` (-1 = padding)
    -> out ``[B, Hq, w, D]``.
    """
    cache, ops = layer.cache, layer.cache.ops
    w = query.shape[2]
    layer.reserve(w)
    ops.append(*layer.state, key, value, qpos)
    if w == 1:
        keys, values, scores, counts, last, slot_pos = layer.state
        out = ops.decode_attention(query[:, :, 0], keys, values, slot_pos, qpos[:, 0], scores,
                                   counts, last, scaling, cache.group_reduce)[:, :, None]
        layer.peak_block = max(layer.peak_block, layer.capacity)
    else:
        out = _block_attention(ops, layer, query, qpos, scaling)
    if cache.policy != "full":
        ops.compress(*layer.state, cache.budget, cache.sinks, cache.recent, cache.policy,
                     cache.cam_window, cache.seed)
    return out


def _check_inputs(layer, query, key, value, attention_mask) -> None:
    """Shapes, dtypes and the mask, checked before anything is written (append, row_seen)."""
    B, H, _, D = layer.keys.shape
    T = key.shape[2]
    if attention_mask is not None and not isinstance(attention_mask, WeightedKVMask):
        raise ValueError(
            "weightedkv attention: expected the 2-D padding attention_mask (turned into a "
            "WeightedKVMask by transformers), got a prepared mask of type "
            f"{type(attention_mask).__name__} and shape "
            f"{tuple(getattr(attention_mask, 'shape', ()))}; pass a 2-D attention_mask")
    shape = tuple(query.shape)
    if query.dim() != 4 or shape[0] != B:
        raise ValueError(f"weightedkv attention: query must be [batch={B}, heads, {T} new tokens, "
                         f"head_dim={D}], got query {shape}")
    if shape[1] == 0 or shape[1] % H != 0:
        raise ValueError(f"weightedkv attention: the number of query heads must be a positive "
                         f"multiple of the {H} KV heads of layer {layer.layer_idx}, got query "
                         f"{shape}")
    if shape[3] != D:
        raise ValueError(f"weightedkv attention: query head_dim must be {D} (the keys'), got "
                         f"query {shape}")
    if shape[2] != T:
        raise ValueError(f"weightedkv attention: query must have {T} tokens (as many as the new "
                         f"keys), got query {shape}")
    if tuple(value.shape) != tuple(key.shape):
        raise ValueError(f"weightedkv attention: value must have the keys' shape "
                         f"{tuple(key.shape)}, got value {tuple(value.shape)}")
    if query.dtype != layer.keys.dtype or query.device != layer.keys.device:
        raise ValueError(f"weightedkv attention: query must be {layer.keys.dtype} on "
                         f"{layer.keys.device} like the keys, got {query.dtype} on {query.device}")
    real = attention_mask.real if attention_mask is not None else None
    if real is not None and tuple(real.shape) != (B, T):
        raise ValueError(f"weightedkv attention: padding mask has shape {tuple(real.shape)}, "
                         f"expected [{B}, {T}]")


def weightedkv_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, attention_mask, dropout: float = 0.0,
                                 scaling: float | None = None, **kwargs):
    """Attention function registered under ``weightedkv`` (AttentionInterface signature).

    query ``[B, Hq, T, D]``, key/value ``[B, H, T, D]`` (the new tokens, tagged by the cache).
    Returns ``([B, T, Hq, D], None)`` like transformers' eager/sdpa functions.
    """
    layer = getattr(key, "_wkv_layer", None)
    if layer is None:  # not a WeightedKVCache (another cache, or none): plain sdpa semantics
        if "cache" in kwargs and type(kwargs["cache"]).__name__ == "WeightedKVCache":
            # A forward without a `cache` argument passes it down here untouched (transformers
            # 5.23 only knows past_key_values=): the cache would be silently ignored.
            raise TypeError("weightedkv attention: this model's forward() has no `cache=` "
                            "argument; pass the WeightedKVCache as past_key_values=")
        if isinstance(attention_mask, WeightedKVMask):
            attention_mask = attention_mask.sdpa()
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    layer.pending = False
    try:
        _check_inputs(layer, query, key, value, attention_mask)
    except ValueError:
        layer.seen -= key.shape[2]  # undo update(): the cache is as before the call
        raise
    cache = layer.cache
    B, Hq, T, D = query.shape
    if scaling is None:
        scaling = D ** -0.5
    real = attention_mask.real if attention_mask is not None else None
    pos = _positions(layer, real, B, T, query.device)
    S = cache.chunk_size
    if real is None:  # no padding: chunks are plain column slices
        outs = [_chunk(layer, query[:, :, s:s + S], key[:, :, s:s + S], value[:, :, s:s + S],
                       pos[:, s:s + S].contiguous(), scaling) for s in range(0, T, S)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.transpose(1, 2).contiguous(), None
    # Padding: per-row chunks of real tokens (_row_chunks); outputs are scattered back to their
    # columns, padding columns stay zero.
    out = query.new_zeros(B, Hq, T, D)
    for cols, qpos in _row_chunks(real.to(query.device), pos, S):
        o = _chunk(layer, _gather_tokens(query, cols), _gather_tokens(key, cols),
                   _gather_tokens(value, cols), qpos, scaling)
        out.scatter_(2, cols[:, None, :, None].expand_as(o), o)  # zeros where qpos == -1
    return out.transpose(1, 2).contiguous(), None


def enable(model):
    """Switch a loaded transformers model to the ``weightedkv`` attention; returns the model."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"enable: model must be a transformers PreTrainedModel (e.g. "
                        f"LlamaForCausalLM), got model={model!r:.100} of type "
                        f"{type(model).__name__}")
    model.set_attn_implementation(NAME)
    if getattr(model.config, "_attn_implementation", None) != NAME:
        raise ValueError(
            f"enable: {type(model).__name__} cannot switch its attention implementation to "
            f"{NAME!r} (it does not use transformers' AttentionInterface)")
    return model


AttentionInterface.register(NAME, weightedkv_attention_forward)
AttentionMaskInterface.register(NAME, weightedkv_mask)
