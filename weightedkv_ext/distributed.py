"""Tensor parallelism and multi-device models: what a cache layer needs to know, and what is refused.

WeightedKV's decisions (and every built-in policy's) are per (layer, batch row, KV head): the
statistics of a KV head come from the query heads of its own GQA group, and the budget is per
head. Under transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under
``torchrun``) ``q_proj``/``k_proj``/``v_proj`` are sharded column-wise, so rank ``r`` of ``n`` holds
KV heads ``r*H/n .. (r+1)*H/n - 1`` and exactly their query heads; every rank sees the same token
ids and padding mask, hence the same positions and chunk boundaries. Each rank therefore
compresses its own heads with no communication. Two things must hold and are checked here:

* the heads split evenly and the GQA group size is the same on every rank (query head ``h*G+g``
  belongs to KV head ``h`` locally as globally), else a rank's heads are not whole groups;
* a policy keyed by the head index (CaM's random draw ``uniform(seed, b, head, pos)``) must use the
  global index: ``tp_layout(...).kv_head_offset + h``.

Refused (a ``ValueError`` naming what to change): pipeline parallelism (a rank runs a subset of
the layers; the cache counts layers from 0), uneven head splits, and a GQA layout that differs
between ranks. Sequence/context parallelism (each rank seeing part of the tokens) would need a
collective for attention over the whole cache; transformers 5.24 does not wire it for inference.

Multi-device models (``device_map``) need nothing from this module: each cache layer allocates its
slots on the device of the keys it receives and never moves them.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TPLayout:
    """Where one attention layer's local heads sit among the model's heads.

    ``kv_head_offset``: global index of local KV head 0 (local KV head ``h`` is global
    ``kv_head_offset + h``): 0 when the layer is not tensor parallel (``tp_size == 1``) or its
    heads are not sharded (every rank holds all of them, e.g. a gathered ``colwise_rep`` plan).
    """

    tp_rank: int
    tp_size: int
    local_q_heads: int
    local_kv_heads: int
    global_q_heads: int
    global_kv_heads: int

    @property
    def sharded(self) -> bool:
        return self.local_kv_heads != self.global_kv_heads

    @property
    def kv_head_offset(self) -> int:
        return self.tp_rank * self.local_kv_heads if self.sharded else 0

    @property
    def q_head_offset(self) -> int:
        return self.tp_rank * self.local_q_heads if self.sharded else 0


def layout_from_counts(local_q_heads: int, local_kv_heads: int, global_q_heads: int,
                       global_kv_heads: int, tp_rank: int, tp_size: int) -> TPLayout:
    """The layout of a rank's heads when ``q_proj``/``k_proj`` are sharded into ``tp_size``
    contiguous, equal blocks (transformers' ``colwise`` style) or not sharded at all; raises for
    anything else (uneven split, or GQA groups cut across ranks)."""
    def fail(msg):
        raise ValueError(f"weightedkv tensor parallel: {msg}")

    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        fail(f"tp_rank must be in [0, tp_size), got tp_rank={tp_rank}, tp_size={tp_size}")
    for name, v in (("local_q_heads", local_q_heads), ("local_kv_heads", local_kv_heads),
                    ("global_q_heads", global_q_heads), ("global_kv_heads", global_kv_heads)):
        if v < 1:
            fail(f"{name} must be >= 1, got {name}={v}")
    if global_q_heads % global_kv_heads:
        fail(f"the model's {global_q_heads} query heads are not a multiple of its "
             f"{global_kv_heads} KV heads")
    if (local_q_heads, local_kv_heads) == (global_q_heads, global_kv_heads):
        return TPLayout(tp_rank, tp_size, local_q_heads, local_kv_heads, global_q_heads,
                        global_kv_heads)  # heads not sharded: every rank holds all of them
    if local_kv_heads * tp_size != global_kv_heads or local_q_heads * tp_size != global_q_heads:
        fail(f"rank {tp_rank} of {tp_size} holds {local_q_heads} query / {local_kv_heads} KV heads "
             f"of the model's {global_q_heads} / {global_kv_heads}: the heads are not split evenly "
             f"(tp_size must divide both head counts; use a tp_size that divides "
             f"{global_kv_heads}, or tp_size=1)")
    # Both counts divide evenly, so the local group size equals the global one: local query head
    # h*G+g (global r*Hq/n + h*G + g) belongs to global KV head r*H/n + h, as in the full model.
    return TPLayout(tp_rank, tp_size, local_q_heads, local_kv_heads, global_q_heads,
                    global_kv_heads)


def _tp_mesh(module: torch.nn.Module):
    """(rank, size) of the tensor-parallel mesh dimension of ``module``'s sharded parameters, or
    None when none of them is a DTensor (the layer is not tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    for p in module.parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            names = mesh.mesh_dim_names or ()
            if mesh.ndim == 1:
                return mesh.get_local_rank(), mesh.size()
            if "tp" in names:
                return mesh.get_local_rank("tp"), mesh.size(names.index("tp"))
            raise ValueError(
                f"weightedkv tensor parallel: {type(module).__name__} has parameters on a "
                f"{mesh.ndim}-D device mesh {names} without a 'tp' dimension; cannot tell which "
                f"heads this rank holds")
    return None


def _global_heads(module: torch.nn.Module) -> tuple[int, int] | None:
    """(query heads, KV heads) of the full layer from its config, or None if unknown."""
    cfg = getattr(module, "config", None)
    if cfg is None:
        return None
    per_layer = getattr(cfg, "per_layer_config", None)
    idx = getattr(module, "layer_idx", None)
    if per_layer is not None and isinstance(idx, int) and 0 <= idx < len(per_layer):
        cfg = per_layer[idx]
    q = getattr(cfg, "num_attention_heads", None)
    if not isinstance(q, int):
        return None
    kv = getattr(cfg, "num_key_value_heads", None) or q
    return q, kv


_LAYOUTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def tp_layout(module: torch.nn.Module, local_q_heads: int, local_kv_heads: int) -> TPLayout:
    """The head layout of the attention ``module`` whose forward received ``local_q_heads`` query
    and ``local_kv_heads`` KV heads (the shapes the attention function sees).

    Not tensor parallel (no DTensor parameter, or a mesh of size 1): offset 0, whatever the head
    counts. Tensor parallel: the rank comes from the parameters' ``tp`` mesh dimension and the full
    head counts from the module's config; the split is validated (``layout_from_counts``). Cached
    per module, so calling it on every forward is cheap.
    """
    key = (local_q_heads, local_kv_heads)
    cached = _LAYOUTS.get(module)
    if cached is not None and key in cached:
        return cached[key]
    mesh = _tp_mesh(module)
    if mesh is None or mesh[1] == 1:
        layout = TPLayout(0, 1, local_q_heads, local_kv_heads, local_q_heads, local_kv_heads)
    else:
        heads = _global_heads(module)
        if heads is None:
            raise ValueError(
                f"weightedkv tensor parallel: {type(module).__name__} is sharded over {mesh[1]} "
                f"ranks but has no config with num_attention_heads, so the global index of its "
                f"heads is unknown (set module.config)")
        layout = layout_from_counts(local_q_heads, local_kv_heads, heads[0], heads[1], *mesh)
    _LAYOUTS.setdefault(module, {})[key] = layout
    return layout


def kv_head_offset(module: torch.nn.Module, local_q_heads: int, local_kv_heads: int) -> int:
    """Global index of the first local KV head of ``module`` (0 without tensor parallelism): the
    ``head_offset`` to pass to ``ops.compress``."""
    return tp_layout(module, local_q_heads, local_kv_heads).kv_head_offset


def check_model(model) -> None:
    """Refuse, before any token is processed, the distributed layouts the cache cannot serve.

    * pipeline parallelism (``pp_size > 1``): a rank runs only some layers, the cache counts them
      from 0 and would need the other ranks' layers;
    * tensor parallelism with a ``tp_size`` that does not divide every layer's query and KV head
      counts (a rank would hold a fraction of a head or of a GQA group).

    Data parallelism / FSDP (each rank its own batch, whole heads at attention time) needs nothing.
    """
    dist_cfg = getattr(getattr(model, "config", None), "distributed_config", None)
    pp_size = getattr(dist_cfg, "pp_size", None) or 1
    if pp_size > 1:
        raise ValueError(
            f"weightedkv: pipeline parallelism is not supported (distributed_config.pp_size="
            f"{pp_size}): each rank would run only some layers of the cache; use tensor "
            f"parallelism (tp_plan=\"auto\") or device_map to spread the model")
    tp_size = getattr(model, "_tp_size", None) or getattr(dist_cfg, "tp_size", None) or 1
    if tp_size <= 1:
        return
    text = model.config.get_text_config(decoder=True)
    per_layer = getattr(text, "per_layer_config", None) or [text]
    for i, cfg in enumerate(per_layer):
        q = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or q
        if q % tp_size or kv % tp_size:
            raise ValueError(
                f"weightedkv tensor parallel: tp_size={tp_size} does not divide layer {i}'s "
                f"{q} query / {kv} KV heads, so a rank would hold part of a head or of a GQA "
                f"group; use a tp_size that divides {kv}")


__all__ = ["TPLayout", "layout_from_counts", "tp_layout", "kv_head_offset", "check_model"]
