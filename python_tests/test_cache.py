"""WeightedKVCache on its own: arguments, the transformers Cache API, tagging, inspection.

The attention function is driven directly with random tensors (no model); model-level behaviour
is in test_integration.py.
"""
from __future__ import annotations

import pytest
import torch

weightedkv_ext = pytest.importorskip(
    "weightedkv_ext", reason="weightedkv_ext is not built (bash scripts/build.sh)")
from weightedkv_ext.attention import WeightedKVMask, weightedkv_attention_forward  # noqa: E402
from weightedkv_ext.cache import POLICIES, WeightedKVCache  # noqa: E402


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=0), "budget must be an int >= 1, got budget=0"),
    (dict(budget=None), "budget must be an int >= 1, got budget=None"),
    (dict(budget=16, policy="lru"), "policy must be one of"),
    (dict(budget=16, backend="cuda"), "backend must be one of"),
    (dict(budget=16, group_reduce="median"), "group_reduce must be one of"),
    (dict(budget=16, chunk_size=0), "chunk_size must be an int >= 1, got chunk_size=0"),
    (dict(budget=16, cam_window=0), "cam_window must be an int >= 1, got cam_window=0"),
    (dict(budget=16, sinks=-1), "sinks must be an int >= 0, got sinks=-1"),
    (dict(budget=16, seed=1.5), "seed must be an int, got seed=1.5"),
    (dict(budget=6, sinks=4), "recent defaults to budget // 2 - sinks"),
    (dict(budget=8, sinks=4, recent=4),
     "budget must exceed sinks \\+ recent, got budget=8, sinks=4, recent=4"),
])
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match="WeightedKVCache: " + match):
        WeightedKVCache(**kwargs)


def test_defaults_follow_the_paper_rule():
    c = WeightedKVCache(256)
    assert (c.budget, c.sinks, c.recent, c.policy) == (256, 4, 124, "weightedkv")
    assert WeightedKVCache(budget=None, policy="full").budget is None
    assert set(POLICIES) == {"weightedkv", "evict", "h2o", "tova", "streaming", "cam", "full"}


def _kv(B=2, H=2, T=5, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(2))


def _run(cache, layer_idx, q, k, v, real=None):
    """What a model's attention layer does: update the cache, then call the attention function."""
    k, v = cache.update(k, v, layer_idx)
    mask = None if real is None else WeightedKVMask(real, None)
    out, weights = weightedkv_attention_forward(None, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    assert weights is None
    return out


def test_update_tags_the_new_tokens_and_creates_layers_lazily():
    cache = WeightedKVCache(16, backend="reference")
    assert len(cache.layers) == 0 and cache.get_seq_length() == 0
    k, v = _kv()
    k2, v2 = cache.update(k, v, 1)
    assert len(cache.layers) == 2 and not cache.layers[0].is_initialized
    assert k2._wkv_layer is cache.layers[1] and not hasattr(k, "_wkv_layer")
    assert torch.equal(k2, k) and torch.equal(v2, v)
    assert cache.get_seq_length(1) == 5 and cache.get_mask_sizes(3, 1) == (8, 0)
    # update() writes nothing (the attention step does): no slots yet, then budget + chunk
    assert cache.layers[1].capacity == 0 and not cache.layers[1].is_initialized
    weightedkv_attention_forward(None, torch.randn(2, 4, 5, 8), k2, v2, None)
    assert cache.layers[1].capacity == 16 + cache.chunk_size


def test_unconsumed_update_is_reported():
    cache = WeightedKVCache(16, backend="reference")
    k, v = _kv()
    cache.update(k, v, 0)
    with pytest.raises(RuntimeError,
                       match=r"layer 0 were never consumed.*weightedkv_ext.enable\(model\)"):
        cache.update(k, v, 1)
    single = WeightedKVCache(16, backend="reference")
    single.update(k, v, 0)
    with pytest.raises(RuntimeError, match=r"updated twice.*attn_implementation=\"weightedkv\""):
        single.update(k, v, 0)


def test_shape_change_needs_reset():
    cache = WeightedKVCache(16, backend="reference")
    k, v = _kv(B=2)
    _run(cache, 0, torch.randn(2, 4, 5, 8), k, v)
    k3, v3 = _kv(B=3)
    with pytest.raises(ValueError, match=r"holds batch=2.*cache.reset\(\)"):
        cache.update(k3, v3, 0)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_bytes() == 0
    _run(cache, 0, torch.randn(3, 4, 5, 8), k3, v3)
    assert cache.held_tokens().tolist() == [[[5, 5]] * 3]


def _causal_attention(q, k, v, real=None):
    """Plain softmax attention of the T new queries over the T new keys (GQA by repeat)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    T = q.shape[2]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    if real is not None:
        allowed = allowed & real[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return out.transpose(1, 2)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("policy", ["weightedkv", "full"])
def test_attention_without_eviction_is_causal_softmax(chunk_size, policy):
    B, Hq, H, T, D = 2, 6, 2, 11, 8
    q = torch.randn(B, Hq, T, D)
    k, v = _kv(B, H, T, D, seed=1)
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :4] = False  # left padding in row 1
    for backend in ("reference", "ops"):
        cache = WeightedKVCache(budget=None if policy == "full" else 64, policy=policy,
                                chunk_size=chunk_size, backend=backend)
        out = _run(cache, 0, q, k, v, real)
        expect = _causal_attention(q, k, v, real)
        torch.testing.assert_close(out[real], expect[real], rtol=1e-5, atol=1e-5)
        assert cache.held_tokens().tolist() == [[[11, 11], [7, 7]]]
        assert cache.layers[0].row_seen.tolist() == [11, 7]
        held_pos = cache.layers[0].slot_pos[1, 0]
        assert sorted(held_pos[held_pos >= 0].tolist()) == list(range(7))  # padding never cached


def test_full_policy_grows_by_doubling():
    cache = WeightedKVCache(budget=None, policy="full", chunk_size=4, backend="reference")
    for step in range(5):
        k, v = _kv(1, 1, 4, 8, seed=step)
        _run(cache, 0, torch.randn(1, 1, 4, 8), k, v)
    assert cache.layers[0].capacity == 32 and cache.held_tokens().item() == 20


def test_inspection_and_batch_selection():
    cache = WeightedKVCache(8, sinks=1, recent=2, chunk_size=4, backend="reference")
    for step in range(4):
        k, v = _kv(3, 2, 4, 16, seed=step, dtype=torch.float16)
        _run(cache, 0, torch.randn(3, 2, 4, 16, dtype=torch.float16), k, v)
    layer = cache.layers[0]
    assert cache.held_tokens().tolist() == [[[8, 8]] * 3]
    C = 8 + 4
    # fp16 K/V + three fp32 stats + the fp32 merged counter + int64 pos
    per_row_head = C * 16 * 2 * 2 + C * 4 * 3 + C * 4 + C * 8
    assert cache.memory_bytes() == 3 * 2 * per_row_head + 3 * 8
    assert cache.kv_bytes_held() == 3 * 2 * 8 * 16 * 2 * 2
    assert layer.scores.dtype == torch.float32 and layer.keys.dtype == torch.float16
    keep = layer.slot_pos[2].clone()
    cache.batch_select_indices(torch.tensor([2]))
    assert torch.equal(layer.slot_pos[0], keep) and layer.row_seen.tolist() == [16]
    cache.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == 2 and torch.equal(layer.slot_pos[1], keep)


def _held(slot_pos):
    return slot_pos[slot_pos >= 0].sort().values


def _alone_at_row(kw, b, q, k, v):
    """Run one unpadded sequence (``[1, ...]`` tensors) as batch row ``b``: ``b + 1`` copies (CaM's
    random draw is keyed by the batch row), row ``b`` taken. Returns (out, slot_pos, row_seen)."""
    cache = WeightedKVCache(**kw)
    copies = [t.expand(b + 1, *t.shape[1:]).contiguous() for t in (q, k, v)]
    out = _run(cache, 0, *copies)
    layer = cache.layers[0]
    return out[b], layer.slot_pos[b], int(layer.row_seen[b])


@pytest.mark.parametrize("backend", ["ops", "reference"])
@pytest.mark.parametrize("policy", ["weightedkv", "tova", "cam"])
def test_padded_rows_are_chunked_as_if_run_alone(policy, backend):
    B, Hq, H, T, D = 3, 4, 2, 23, 8
    kw = dict(budget=8, sinks=1, recent=2, policy=policy, chunk_size=4, backend=backend)
    real = torch.zeros(B, T, dtype=torch.bool)
    real[0, 2:] = True  # left padding, 21 real tokens: chunks of 4, 4, 4, 4, 4, then 1 (decode)
    real[1, 1::3] = True  # scattered padding, 8 real tokens
    real[2, [5, 22]] = True  # 2 real tokens: all padding from the second chunk on
    q = torch.randn(B, Hq, T, D, generator=torch.Generator().manual_seed(3))
    k, v = _kv(B, H, T, D, seed=4)
    cache = WeightedKVCache(**kw)
    out = _run(cache, 0, q, k, v, real)
    layer = cache.layers[0]
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))  # padding outputs are zero
    for b in range(B):
        r = real[b]
        got, slot_pos, seen = _alone_at_row(kw, b, q[b:b + 1, :, r], k[b:b + 1, :, r],
                                            v[b:b + 1, :, r])
        torch.testing.assert_close(out[b, r], got, rtol=1e-5, atol=1e-5)
        # Held positions per head (the capacities may differ: slots grow with the tokens held)
        for h in range(H):
            assert torch.equal(_held(layer.slot_pos[b, h]), _held(slot_pos[h]))
        assert int(layer.row_seen[b]) == seen == int(r.sum())
    assert layer.peak_block == 4 * layer.capacity  # chunks never wider than chunk_size
