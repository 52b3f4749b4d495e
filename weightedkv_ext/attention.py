"""The ``weightedkv`` attention implementation for transformers: a short adapter to the engine.

* ``WeightedKVCache.update()`` checks the new keys/values and returns the keys tagged with their
  cache layer (cache.py says why a tag); the attention function below calls
  ``layer.attend(query, key, value, mask, scaling, window=, softcap=, sink_logits=)``, where the
  layer's ``KVEngine`` (engine.py) runs positions, chunking and append -> attention -> compress.
* ``create_causal_mask`` calls the registered mask function ``weightedkv_mask`` with the 2-D
  ``attention_mask`` (padding); it returns a ``WeightedKVMask``: which new tokens are real per row
  and how many cached columns the mask still calls real. Causality is applied per slot from
  ``slot_pos``, so no ``[queries x keys]`` mask is built.
* Every keyword transformers passes is either implemented (``scaling``, ``sliding_window``,
  ``softcap``, ``s_aux``), checked to be harmless, or refused with an error naming it.
* Untagged keys (another cache, or no cache) fall back to transformers' ``sdpa`` attention.

Importing this module registers the function and the mask under ``"weightedkv"``; ``import
weightedkv_ext`` arranges that as soon as transformers is imported (``_register.py``).
"""
from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface, PreTrainedModel

from . import distributed
from .cache import WeightedKVCache

NAME = "weightedkv"

# Keywords transformers passes that do not change the attention of a causal decoder with our
# positions (RoPE is applied before; the cache gives positions and padding).
_HARMLESS = frozenset({"position_ids", "cache_position", "use_cache", "output_hidden_states",
                       "return_dict", "num_items_in_batch", "output_router_logits",
                       "token_type_ids", "layer_idx", "past_key_value", "position_embeddings"})


class WeightedKVMask:
    """What the ``weightedkv`` mask function hands to the attention function.

    ``real``: bool ``[B, Q]`` (True = real token, False = padding) for the new tokens, or None when
    every token is real. ``past``: bool ``[B, past_columns]``, what the 2-D mask says about the
    columns before the new tokens (None: the mask covered only the new tokens).
    before the new tokens the 2-D mask marks real (None: the mask covered only the new tokens).
    ``sdpa()`` builds the ordinary sdpa mask, for the fallback path only.
    """

    __slots__ = ("real", "past", "_sdpa_kwargs", "_sdpa_mask")

    def __init__(self, real: torch.Tensor | None, sdpa_kwargs: dict | None,
                 past: torch.Tensor | None = None):
        self.real = real
        self.past = past
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
    real, past = None, None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size \
                or attention_mask.shape[1] < q_length:
            raise ValueError(
                f"weightedkv attention: attention_mask must be 2-D [batch={batch_size}, >= "
                f"{q_length} new tokens], got shape {tuple(attention_mask.shape)}")
        real = attention_mask[:, -q_length:].to(torch.bool)
        if bool(real.all()):
            real = None
        if attention_mask.shape[1] > q_length:
            past = attention_mask[:, :-q_length].to(torch.bool)
    sdpa_kwargs = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                       q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask,
                       **kwargs)
    return WeightedKVMask(real, sdpa_kwargs, past)


def _check_kwargs(module, dropout, kwargs) -> None:
    """Refuse what the weightedkv attention does not implement, naming it."""
    if kwargs.get("output_attentions"):
        raise ValueError("weightedkv attention: output_attentions=True is not supported (the "
                         "attention weights over compressed slots are never materialised); "
                         "call the model without output_attentions or use attn_implementation="
                         "'eager' with a DynamicCache")
    if kwargs.get("is_causal", True) is False:
        raise ValueError("weightedkv attention: is_causal=False (bidirectional attention) is "
                         "not supported; weightedkv serves causal decoders only")
    if dropout and (module is None or module.training):
        raise ValueError(f"weightedkv attention: dropout={dropout} is not supported (inference "
                         "only); call model.eval()")
    for name, value in kwargs.items():
        if name in _HARMLESS or name in ("output_attentions", "is_causal") or value is None:
            continue
        raise TypeError(f"weightedkv attention: the model passed the attention keyword "
                        f"{name}={_short(value)}, which weightedkv does not implement; results "
                        "would be wrong, so the call is refused (use another attention "
                        "implementation for this model)")


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    return f"{value!r:.60}"


def weightedkv_attention_forward(module: torch.nn.Module | None, query: torch.Tensor,
                                 key: torch.Tensor, value: torch.Tensor, attention_mask,
                                 dropout: float = 0.0, scaling: float | None = None,
                                 sliding_window: int | None = None, softcap: float | None = None,
                                 s_aux: torch.Tensor | None = None, **kwargs):
    """Attention function registered under ``weightedkv`` (AttentionInterface signature).

    query ``[B, Hq, T, D]``, key/value ``[B, H, T, D]`` (the new tokens, tagged by the cache).
    Returns ``([B, T, Hq, D], None)`` like transformers' eager/sdpa functions.
    """
    layer = getattr(key, "_wkv_layer", None)
    if layer is None:  # not a WeightedKVCache (another cache, or none): plain sdpa semantics
        return _fallback(module, query, key, value, attention_mask, dropout, scaling,
                         sliding_window, softcap, s_aux, kwargs)
    try:
        _check_kwargs(module, dropout, kwargs)
        if attention_mask is not None and not isinstance(attention_mask, WeightedKVMask):
            raise ValueError(
                "weightedkv attention: expected the 2-D padding attention_mask (turned into a "
                "WeightedKVMask by transformers), got a prepared mask of type "
                f"{type(attention_mask).__name__} and shape "
                f"{tuple(getattr(attention_mask, 'shape', ()))}; pass a 2-D attention_mask")
        if module is not None:
            # Tensor parallelism: this rank's KV head h is the model's head head_offset + h
            # (CaM's draw is keyed by it); 0 without TP. Refuses heads that are not whole groups.
            # Cached on the module: distributed's WeakKeyDictionary cache is unsafe to guard on
            # under torch.compile (its keys change as other modules are collected).
            heads = (query.shape[1], key.shape[1])
            offsets = getattr(module, "_wkv_kv_head_offsets", None)
            if offsets is None or heads not in offsets:
                offsets = {**(offsets or {}), heads: distributed.kv_head_offset(module, *heads)}
                module._wkv_kv_head_offsets = offsets
            layer.engine.head_offset = offsets[heads]
    except Exception:
        layer.pending = False
        layer.seen -= key.shape[2]  # undo update()
        raise
    out = layer.attend(query, key, value, attention_mask, scaling, window=sliding_window or 0,
                       softcap=softcap or 0.0, sink_logits=s_aux)
    return out.transpose(1, 2).contiguous(), None


def _fallback(module, query, key, value, attention_mask, dropout, scaling, sliding_window,
              softcap, s_aux, kwargs):
    if isinstance(kwargs.get("cache"), WeightedKVCache):
        # A forward without a `cache` argument passes it down here untouched (transformers
        # 5.23 only knows past_key_values=): the cache would be silently ignored.
        raise TypeError("weightedkv attention: this model's forward() has no `cache=` "
                        "argument; pass the WeightedKVCache as past_key_values=")
    if softcap or s_aux is not None:
        raise ValueError(
            "weightedkv attention: this model uses "
            f"{'softcap' if softcap else 's_aux (attention sinks)'}, which the weightedkv "
            "attention implements only with a WeightedKVCache; pass one (model(ids, "
            "**WeightedKVCache(budget).as_kwargs())) or load the model with "
            "attn_implementation='eager' to run it without")
    if isinstance(attention_mask, WeightedKVMask):
        attention_mask = attention_mask.sdpa()
    # sdpa's mask already applies the sliding window, as for attn_implementation="sdpa".
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def enable(model):
    """Switch a loaded transformers model to the ``weightedkv`` attention; returns the model.

    Refuses (with the reason) models the engine cannot serve exactly: encoder-decoders and
    models whose value head dimension differs from the key head dimension (MLA).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"enable: model must be a transformers PreTrainedModel (e.g. "
                        f"LlamaForCausalLM), got model={model!r:.100} of type "
                        f"{type(model).__name__}")
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"enable: {type(model).__name__} is an encoder-decoder model; weightedkv "
                         "compresses the self-attention cache of decoder-only models (keep "
                         "attn_implementation='sdpa' for this one)")
    v_dim = getattr(text, "v_head_dim", None)
    k_dim = getattr(text, "qk_head_dim", None) or getattr(text, "head_dim", None)
    if v_dim is not None and k_dim is not None and v_dim != k_dim:
        raise ValueError(f"enable: {type(model).__name__} has value head_dim {v_dim} != key "
                         f"head_dim {k_dim} (multi-head latent attention); weightedkv needs "
                         "one head_dim for keys and values")
    distributed.check_model(model)  # pipeline parallelism, a tp_size that splits heads
    model.set_attn_implementation(NAME)
    if getattr(model.config, "_attn_implementation", None) != NAME:
        raise ValueError(
            f"enable: {type(model).__name__} cannot switch its attention implementation to "
            f"{NAME!r} (it does not use transformers' AttentionInterface)")
    return model


def register() -> None:
    """Register the attention and its mask under ``"weightedkv"`` (idempotent)."""
    AttentionInterface.register(NAME, weightedkv_attention_forward)
    AttentionMaskInterface.register(NAME, weightedkv_mask)


register()
