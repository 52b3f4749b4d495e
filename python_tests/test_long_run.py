"""Long streams: a fixed budget keeps memory flat over 50,000 tokens.

* model level: a tiny random Llama (2 layers, hidden 32) streams 50,000 tokens through a
  WeightedKVCache with budget 64 (64-token forward calls, chunk_size 32 inside, then a
  token-by-token tail): after warm-up the process RSS grows by less than a small bound, the
  cache's tensor bytes never change, every (layer, row, head) holds exactly 64 tokens including
  the sinks and the recent window, positions keep counting;
* ops level: the same length through append -> accumulate -> compress with random probabilities:
  the six tensors are never reallocated, exactly `budget` tokens are held;
* reset(): a reset cache gives bit-identical results to a new one.

WKV_LONG_RUN_TOKENS overrides the length (default 50,000).
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

from helpers import compiled_ops, ref

psutil = pytest.importorskip("psutil", reason="psutil measures the process RSS")
weightedkv_ext = pytest.importorskip("weightedkv_ext",
                                     reason="weightedkv_ext is not built (bash scripts/build.sh)")
from weightedkv_ext import WeightedKVCache  # noqa: E402

from test_validation_cache import ids, tiny_llama  # noqa: E402

TOKENS = int(os.environ.get("WKV_LONG_RUN_TOKENS", "50000"))
BUDGET, SINKS, STEP = 64, 4, 64
WARMUP = 4096
RSS_GROWTH_LIMIT = 16 * 2 ** 20  # bytes after warm-up (measured: ~2 MiB); the cache is ~40 KiB


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def check_cache(cache, n):
    recent = cache.recent
    for layer in cache.layers:
        assert layer.seen == n and layer.row_seen.tolist() == [n]
        pos = layer.slot_pos[0]
        held = pos >= 0
        assert (held.sum(-1) == min(n, BUDGET)).all()
        for h in range(pos.shape[0]):
            kept = pos[h][held[h]].sort().values
            assert kept[:SINKS].tolist() == list(range(SINKS))
            assert kept[-recent:].tolist() == list(range(n - recent, n))


@pytest.mark.slow
def test_50k_token_stream_through_a_model_keeps_memory_flat(one_thread):
    model = tiny_llama(layers=2, hidden=32)
    cache = WeightedKVCache(budget=BUDGET, sinks=SINKS, chunk_size=32)
    tokens = ids(TOKENS, seed=3)
    tail = min(1024, TOKENS // 8)  # token-by-token (fused decode path) at the end
    samples, base_rss, base_bytes = [], None, None
    n = 0
    with torch.inference_mode():
        while n < TOKENS - tail:
            step = min(STEP, TOKENS - tail - n)
            logits = model(tokens[:, n:n + step], past_key_values=cache).logits
            n += step
            assert torch.isfinite(logits).all()
            if n == WARMUP:
                base_rss, base_bytes = rss(), cache.memory_bytes()
            if n % 4096 == 0 or n == TOKENS - tail:
                check_cache(cache, n)
                if base_rss is not None:
                    samples.append(rss())
                    assert cache.memory_bytes() == base_bytes
        for _ in range(tail):
            logits = model(tokens[:, n:n + 1], past_key_values=cache).logits
            n += 1
            assert torch.isfinite(logits).all()
    check_cache(cache, TOKENS)
    assert cache.get_seq_length() == TOKENS
    if base_rss is not None:
        samples.append(rss())
        assert cache.memory_bytes() == base_bytes
        growth = max(samples) - base_rss
        assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2 ** 20:.1f} MiB after warm-up"


def test_50k_token_stream_through_the_ops_keeps_the_cache_at_budget(one_thread):
    ops = compiled_ops()
    B, H, G, D, sinks, recent = 2, 2, 2, 8, 4, 28
    C = BUDGET + STEP
    st = ref.new_state(B, H, C, D, torch.float16)
    ptrs = [t.data_ptr() for t in st]
    g = torch.Generator().manual_seed(0)
    base_rss, samples = None, []
    for n in range(0, TOKENS, STEP):
        T = min(STEP, TOKENS - n)
        pos = torch.arange(n, n + T).repeat(B, 1)
        ops.append(*st, torch.randn(B, H, T, D, generator=g).half(),
                   torch.randn(B, H, T, D, generator=g).half(), pos)
        probs = torch.rand(B, H * G, T, C, generator=g).softmax(-1)
        ops.accumulate(probs, st.slot_pos, pos, st.scores, st.counts, st.last)
        ops.compress(*st, BUDGET, sinks, recent, "weightedkv")
        held = st.slot_pos >= 0
        assert (held.sum(-1) == min(n + T, BUDGET)).all()
        assert int(st.slot_pos.max()) == n + T - 1
        if n + T == WARMUP:
            base_rss = rss()
        elif base_rss is not None and (n + T) % 8192 == 0:
            samples.append(rss())
    assert [t.data_ptr() for t in st] == ptrs  # never reallocated
    assert torch.isfinite(st.values[st.slot_pos >= 0]).all()
    kept = st.slot_pos.sort(-1).values[..., -BUDGET:]  # the held positions, ascending
    assert (kept[..., :sinks] == torch.arange(sinks)).all()
    assert (kept[..., -recent:] == torch.arange(TOKENS - recent, TOKENS)).all()
    if samples:
        assert max(samples) - base_rss < RSS_GROWTH_LIMIT


def test_reset_cache_equals_a_new_cache(one_thread):
    """Chunked prefill + token-by-token decode, for each policy family: a reset() cache replays
    the stream bit for bit like a fresh one (same logits, same slots)."""
    model = tiny_llama(layers=2, hidden=32)
    tokens = ids(900, seed=4)

    def run(cache):
        out = []
        with torch.inference_mode():
            for s in range(0, 832, 64):
                out.append(model(tokens[:, s:s + 64], past_key_values=cache).logits)
            for s in range(832, 900):
                out.append(model(tokens[:, s:s + 1], past_key_values=cache).logits)
        return torch.cat(out, 1), [[t.clone() for t in layer.state] for layer in cache.layers]

    for policy in ("weightedkv", "h2o", "cam"):
        kw = dict(budget=BUDGET, sinks=SINKS, chunk_size=32, policy=policy, seed=1)
        reused = WeightedKVCache(**kw)
        first, _ = run(reused)
        reused.reset()
        assert reused.get_seq_length() == 0 and reused.memory_bytes() == 0
        again, state_again = run(reused)
        fresh, state_fresh = run(WeightedKVCache(**kw))
        assert torch.equal(again, fresh) and torch.equal(first, fresh)
        for la, lf in zip(state_again, state_fresh):
            for a, f in zip(la, lf):
                assert torch.equal(a, f)
