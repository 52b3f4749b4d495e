"""Hypothesis fuzzing of WeightedKVCache + the weightedkv attention function (no model: the
attention function is called as a model layer would, after cache.update()).

Random batch sizes, GQA groups, head_dims, dtypes, policies, budgets, chunk sizes, call lengths
and padding patterns. After every call: no crash, every (row, KV head) holds exactly
min(real tokens so far, budget) distinct positions including the sinks and the recent window,
row_seen counts the real tokens, outputs are finite and zero at padding columns; and each row of
a padded batch equals the same sequence streamed alone (the integration's contract; for CaM only
row 0, as its random draw depends on the batch row).
Reproducible: derandomize=True, database=None; WKV_FUZZ_EXAMPLES scales the example count.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from test_fuzz_ops import fuzz_settings

weightedkv_ext = pytest.importorskip("weightedkv_ext",
                                     reason="weightedkv_ext is not built (bash scripts/build.sh)")
from weightedkv_ext.attention import WeightedKVMask, weightedkv_attention_forward  # noqa: E402
from weightedkv_ext.cache import WeightedKVCache  # noqa: E402

COMPRESSING = ("weightedkv", "evict", "h2o", "tova", "streaming", "cam")


def call(cache, q, k, v, real):
    """What a model layer does: update the cache, then run the attention function."""
    k, v = cache.update(k, v, 0)
    mask = None if real is None else WeightedKVMask(real, None)
    out, _ = weightedkv_attention_forward(None, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    return out  # [B, T, Hq, D]


def check_invariants(cache, n_real, budget, sinks, recent):
    layer = cache.layers[0]
    assert layer.row_seen.tolist() == n_real
    for b, n in enumerate(n_real):
        for h in range(layer.slot_pos.shape[1]):
            row = layer.slot_pos[b, h]
            held = sorted(row[row >= 0].tolist())
            assert len(held) == min(n, budget) and len(set(held)) == len(held)
            assert all(0 <= p < n for p in held)
            if n > budget:
                assert held[:sinks] == list(range(sinks))
                assert held[len(held) - recent:] == list(range(n - recent, n))
            free = row < 0
            for stat in (layer.scores, layer.counts, layer.last):
                assert (stat[b, h][free] == 0).all()  # freed slots carry no statistics


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz_settings(250)
@given(data=st.data())
def test_fuzz_cache_streams(data):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), label="dtype")
    B, H, G = draw(st.integers(1, 3), label="B"), draw(st.integers(1, 2), label="H"), \
        draw(st.integers(1, 3), label="G")
    D = draw(st.sampled_from([2, 4, 8]), label="D")
    budget = draw(st.integers(2, 8), label="budget")
    sinks = draw(st.integers(0, budget - 1), label="sinks")
    recent = draw(st.integers(0, budget - 1 - sinks), label="recent")
    policy = draw(st.sampled_from(COMPRESSING), label="policy")
    chunk = draw(st.integers(1, 5), label="chunk_size")
    reduce = draw(st.sampled_from(["mean", "sum", "max"]), label="group_reduce")
    kw = dict(budget=budget, sinks=sinks, recent=recent, policy=policy, chunk_size=chunk,
              group_reduce=reduce, cam_window=draw(st.integers(1, 4), label="cam_window"))
    cache = WeightedKVCache(**kw)
    alone = [WeightedKVCache(**kw) for _ in range(B)] if B > 1 else []
    g = torch.Generator().manual_seed(draw(st.integers(0, 999), label="seed"))
    n_real = [0] * B
    for _ in range(draw(st.integers(1, 4), label="calls")):
        T = draw(st.integers(1, 12), label="T")
        q = torch.randn(B, H * G, T, D, generator=g).to(dtype)
        k = torch.randn(B, H, T, D, generator=g).to(dtype)
        v = torch.randn(B, H, T, D, generator=g).to(dtype)
        pattern = draw(st.sampled_from(["none", "left", "random"]), label="padding")
        if pattern == "none":
            real = None
        elif pattern == "left":
            real = torch.arange(T)[None, :] >= torch.tensor(
                [draw(st.integers(0, T), label="pad") for _ in range(B)])[:, None]
        else:
            real = torch.rand(B, T, generator=g) < 0.7
        out = call(cache, q, k, v, real)
        assert out.shape == (B, T, H * G, D) and out.dtype == dtype
        assert torch.isfinite(out).all()
        mask = torch.ones(B, T, dtype=torch.bool) if real is None else real
        assert (out[~mask] == 0).all()
        for b in range(B):
            n_real[b] += int(mask[b].sum())
        check_invariants(cache, n_real, budget, sinks, recent)
        for b, single in enumerate(alone):  # each row == the same sequence alone
            cols = mask[b].nonzero().flatten()
            if len(cols) == 0 or (policy == "cam" and b > 0):
                continue  # CaM's draw uniform(seed, b, h, pos) depends on the batch row b
            sub = [x[b:b + 1, :, cols] for x in (q, k, v)]
            out_b = call(single, *sub, None)
            torch.testing.assert_close(out[b, cols], out_b[0], rtol=1e-5, atol=1e-5)
            # Same slots (capacities may differ: slots grow with the tokens held)
            mine, theirs = single.layers[0].slot_pos[0], cache.layers[0].slot_pos[b]
            n = min(mine.shape[-1], theirs.shape[-1])
            assert torch.equal(mine[:, :n], theirs[:, :n])
            assert (mine[:, n:] == -1).all() and (theirs[:, n:] == -1).all()
