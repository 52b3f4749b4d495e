"""A vLLM v1 attention backend that keeps a WeightedKV-compressed cache per request.

Design (docs/serving.md): vLLM's KV manager sees an ordinary sliding-window layer
(``customize_spec`` turns the layer's ``FullAttentionSpec`` into a ``SlidingWindowSpec`` of
``window = budget + chunk_size + 1``), so it frees every block older than the last ``window - 1``
tokens of a request and its accounting is bounded by the window. Inside those retained blocks the
backend keeps the request's fixed-slot cache of ``C = budget + chunk_size`` slots per KV head,
exactly the state a ``WeightedKVCache`` layer holds for one batch row:

* slot ``i`` of the cache lives in the paged KV cache at the request's **logical** slot
  ``L - 1 - i`` (``L`` = tokens computed so far): keys/values in vLLM's KV tensor, the statistics
  (``scores``, ``counts``, ``last``) and ``slot_pos`` (absolute positions) in a side tensor of the
  same page geometry (``[num_blocks, block_size, H]`` per layer);
* each step, per request: gather the ``C`` slots from logical ``L0 - 1 - i``, run the project's own
  per-chunk step (``KVEngine._chunk`` of ``weightedkv_ext.engine``: append -> attention + statistics ->
  compress, chunks of ``chunk_size`` as in ``generate()``) on the new tokens, scatter the slots
  back to logical ``L - 1 - i``. The ``window`` retains logical slots ``>= L - C``, so nothing the
  next step reads is ever freed.

Positions stay absolute: vLLM applies RoPE with the token's absolute position before attention
and ``slot_pos`` stores that position; eviction never renumbers anything.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import (
    AttentionSpec,
    FullAttentionSpec,
    KVCacheLayout,
    SlidingWindowSpec,
)

from ..cache import _ENGINE_ARGS
from ..engine import KVEngine
from . import settings as _settings

NAME = "WEIGHTEDKV"


def _require_settings() -> _settings.Settings:
    s = _settings.from_env()
    if s is None:
        raise RuntimeError(f"weightedkv vLLM backend: selected but ${_settings.ENV} is unset; set "
                           f"it (e.g. {_settings.ENV}='budget=256') before starting vLLM")
    return s


class WeightedKVAttentionBackend(AttentionBackend):
    """Decoder self-attention over a per-request WeightedKV cache (CPU prototype)."""

    forward_includes_kv_cache_update: bool = True  # forward() writes the slots itself
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type["WeightedKVAttentionImpl"]:
        return WeightedKVAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["WeightedKVMetadataBuilder"]:
        return WeightedKVMetadataBuilder

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)  # per layer [blocks, kv_heads, block_size, 2 * head_size]

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """A full-attention layer becomes a sliding-window layer of ``Settings.window`` tokens."""
        s = _require_settings()
        if isinstance(spec, SlidingWindowSpec):
            if spec.sliding_window == s.window:
                return spec
            raise NotImplementedError(
                f"weightedkv vLLM backend: the model already has a sliding window of "
                f"{spec.sliding_window} tokens; only full-attention models are supported")
        if type(spec) is not FullAttentionSpec:
            raise NotImplementedError(f"weightedkv vLLM backend: unsupported KV cache spec "
                                      f"{type(spec).__name__}; only full attention is supported")
        base = {f.name: getattr(spec, f.name) for f in fields(AttentionSpec) if f.init}
        return SlidingWindowSpec(**base, sliding_window=s.window)


@dataclass
class WeightedKVMetadata:
    num_actual_tokens: int
    query_start_loc: list[int]  # [num_reqs + 1], host
    seq_lens: list[int]  # [num_reqs]: tokens computed after this step (prompt + generated)
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32, vLLM's block ids (0 = null block)


class WeightedKVMetadataBuilder(AttentionMetadataBuilder[WeightedKVMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        cache_config = vllm_config.cache_config
        if cache_config.enable_prefix_caching:
            raise ValueError(
                "weightedkv vLLM backend: prefix caching must be off (a block holds compressed "
                "slots, not the tokens its hash names); pass enable_prefix_caching=False")
        if vllm_config.speculative_config is not None:
            raise ValueError("weightedkv vLLM backend: speculative decoding is not supported (a "
                             "rejected draft cannot be un-compressed); remove speculative_config")

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> WeightedKVMetadata:
        m = common_attn_metadata
        return WeightedKVMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc_cpu.tolist(),
            seq_lens=m.seq_lens.cpu().tolist(),
            block_table=m.block_table_tensor,
        )


class WeightedKVAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None,
                 kv_cache_dtype: str, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None, **kwargs) -> None:
        s = _require_settings()
        unsupported = {
            "alibi_slopes": alibi_slopes, "logits_soft_cap": logits_soft_cap or None,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name, "sinks": sinks,
            "sliding_window": sliding_window if sliding_window not in (None, s.window) else None,
        }
        for name, value in unsupported.items():
            if value is not None:
                raise NotImplementedError(f"weightedkv vLLM backend: {name}={value!r} is not "
                                          f"supported (prototype: plain causal Llama-style "
                                          f"attention); run this model without the plugin")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"weightedkv vLLM backend: attn_type={attn_type!r} is not "
                                      f"supported, only decoder self-attention")
        if kv_cache_dtype != "auto":
            raise NotImplementedError(f"weightedkv vLLM backend: kv_cache_dtype={kv_cache_dtype!r}"
                                      f" is not supported; use kv_cache_dtype='auto'")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.settings = s
        self.cache = s.cache()  # policy, ops and validation of the project's WeightedKVCache
        # The project's engine (the one both of its doors use) runs each request's chunk steps on
        # slots gathered from vLLM's blocks; it is loaded per request and emptied afterwards.
        self.engine = KVEngine(**{a: getattr(self.cache, a) for a in _ENGINE_ARGS},
                               name="weightedkv vLLM backend", reset_hint="a new request")
        self.engine.transactional = False  # the slots are scratch copies of vLLM's blocks
        self._side: tuple[torch.Tensor, torch.Tensor] | None = None
        self._side_key = None

    def _side_tensors(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``stats`` float32 ``[blocks, block_size, H, 3]`` (scores, counts, last) and
        ``pos`` int64 ``[blocks, block_size, H]``, one entry per physical KV slot and head."""
        num_blocks, H, block_size, _ = kv_cache.shape
        key = (kv_cache.data_ptr(), num_blocks, block_size)
        if self._side_key != key:
            self._side = (torch.zeros(num_blocks, block_size, H, 3, dtype=torch.float32,
                                      device=kv_cache.device),
                          torch.full((num_blocks, block_size, H), -1, dtype=torch.int64,
                                     device=kv_cache.device))
            self._side_key = key
        return self._side

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: WeightedKVMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query/output ``[tokens, Hq, D]``, key/value ``[tokens, H, D]``, kv_cache
        ``[blocks, H, block_size, 2 D]`` (keys in ``[..., :D]``, values in ``[..., D:]``)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("weightedkv vLLM backend: fused output quantization is not "
                                      "supported")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        stats, pos = self._side_tensors(kv_cache)
        qsl, seq_lens = attn_metadata.query_start_loc, attn_metadata.seq_lens
        for r, L in enumerate(seq_lens):
            s, e = qsl[r], qsl[r + 1]
            if e > s:
                output[s:e] = self._request(query[s:e], key[s:e], value[s:e], kv_cache, stats,
                                            pos, attn_metadata.block_table[r], L)
        return output

    def _logical_slots(self, row: torch.Tensor, logical: torch.Tensor, block_size: int):
        return row[logical // block_size].long(), logical % block_size

    def _request(self, q, k, v, kv_cache, stats, pos, row, L) -> torch.Tensor:
        """One request: gather its slots, the project's chunk steps on the new tokens, scatter."""
        n = q.shape[0]
        L0 = L - n
        C, H, D = self.settings.capacity, self.num_kv_heads, self.head_size
        block_size = kv_cache.shape[2]
        dev, dtype = kv_cache.device, kv_cache.dtype
        keys = torch.zeros(1, H, C, D, dtype=dtype, device=dev)
        values = torch.zeros(1, H, C, D, dtype=dtype, device=dev)
        sc = torch.zeros(3, 1, H, C, dtype=torch.float32, device=dev)  # scores, counts, last
        slot_pos = torch.full((1, H, C), -1, dtype=torch.int64, device=dev)
        k_old = min(C, L0)  # slots >= L0 were never used (fewer tokens than slots seen so far)
        if k_old:
            blk, off = self._logical_slots(row, L0 - 1 - torch.arange(k_old, device=dev),
                                           block_size)
            kv = kv_cache[blk, :, off]  # [k_old, H, 2D]
            keys[0, :, :k_old] = kv[..., :D].transpose(0, 1)
            values[0, :, :k_old] = kv[..., D:].transpose(0, 1)
            sc[:, 0, :, :k_old] = stats[blk, off].permute(2, 1, 0)
            slot_pos[0, :, :k_old] = pos[blk, off].transpose(0, 1)
        e = self.engine
        e.keys, e.values, e.scores, e.counts, e.last, e.slot_pos = (keys, values, sc[0], sc[1],
                                                                    sc[2], slot_pos)
        e.row_seen = torch.tensor([L0], dtype=torch.int64, device=dev)
        qh = q.transpose(0, 1)[None]  # [1, Hq, n, D]
        kh, vh = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, H, n, D]
        qpos = torch.arange(L0, L, device=dev)[None]  # absolute positions, [1, n]
        S = self.settings.chunk_size
        try:
            outs = [e._chunk(qh[:, :, c:c + S], kh[:, :, c:c + S], vh[:, :, c:c + S],
                             qpos[:, c:c + S].contiguous(), self.scale, (0, 0.0, None))
                    for c in range(0, n, S)]
        finally:
            e.reset()
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [1, Hq, n, D]
        k_new = min(C, L)
        blk, off = self._logical_slots(row, L - 1 - torch.arange(k_new, device=dev), block_size)
        kv_cache[blk, :, off] = torch.cat([keys[0, :, :k_new], values[0, :, :k_new]],
                                          dim=-1).transpose(0, 1)
        stats[blk, off] = sc[:, 0, :, :k_new].permute(2, 1, 0)
        pos[blk, off] = slot_pos[0, :, :k_new].transpose(0, 1)
        return out[0].transpose(0, 1)
