"""WeightedKVCache + the "weightedkv" attention inside a (tiny, random) transformers Llama.

Every comparison is against an independent run: DynamicCache + sdpa when nothing is evicted, the
pure-PyTorch reference backend (weightedkv_ext/reference.py) when compression is on, per-sequence
runs for batches, sequential runs for threads.
"""
from __future__ import annotations

import inspect
import threading

import pytest
import torch

weightedkv_ext = pytest.importorskip(
    "weightedkv_ext", reason="weightedkv_ext is not built (bash scripts/build.sh)")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaModel  # noqa: E402

from weightedkv_ext.cache import WeightedKVCache  # noqa: E402

COMPRESSING = ["weightedkv", "evict", "h2o", "tova", "streaming", "cam"]
LOGITS_TOL = dict(rtol=1e-4, atol=1e-4)


def tiny_llama(kv_heads: int = 2, dtype=torch.float32, seed: int = 0, attn: str = "weightedkv"):
    """2 layers, hidden 64, 4 query heads of dim 16, vocab 128; MHA (kv_heads=4) or GQA."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                      max_position_embeddings=4096, initializer_range=0.1,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def tokens(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, n), generator=g)  # no pad (0), bos (1), eos (2)


@torch.no_grad()
def stream(model, ids, cache, step: int, explicit_positions: bool = False, check_budget=None):
    """Feed ids to the model `step` tokens per call; returns the logits of every token."""
    out = []
    for s in range(0, ids.shape[1], step):
        kw = {}
        if explicit_positions:
            kw["position_ids"] = torch.arange(s, min(s + step, ids.shape[1]))[None]
        out.append(model(ids[:, s:s + step], past_key_values=cache, **kw).logits)
        if check_budget is not None:
            assert int(cache.held_tokens().max()) <= check_budget
    return torch.cat(out, dim=1)


# -- no eviction: identical to the stock cache --------------------------------------------------

@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_matches_dynamic_cache_when_budget_exceeds_length(kv_heads):
    model, ids = tiny_llama(kv_heads), tokens(70)
    expect = stream(tiny_llama(kv_heads, attn="sdpa"), ids, DynamicCache(), step=70)
    for step in (70, 9, 1):
        cache = WeightedKVCache(budget=256, chunk_size=16)
        torch.testing.assert_close(stream(model, ids, cache, step), expect, **LOGITS_TOL)
    full = WeightedKVCache(budget=None, policy="full", chunk_size=16)
    torch.testing.assert_close(stream(model, ids, full, step=30), expect, **LOGITS_TOL)
    assert full.held_tokens().min() == 70


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_generate_matches_dynamic_cache(kv_heads):
    model, sdpa, ids = tiny_llama(kv_heads), tiny_llama(kv_heads, attn="sdpa"), tokens(40)
    gen = dict(max_new_tokens=25, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        expect = sdpa.generate(ids, **gen)
        got = model.generate(ids, past_key_values=WeightedKVCache(budget=128, chunk_size=16), **gen)
    assert torch.equal(got.sequences, expect.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expect.logits), **LOGITS_TOL)


def test_cache_keyword_spelling():
    model, ids = tiny_llama(), tokens(20)
    with torch.no_grad():
        a = model(ids, past_key_values=WeightedKVCache(budget=64)).logits
        if "cache" not in inspect.signature(LlamaModel.forward).parameters:
            # transformers 5.23: `cache=` is no forward argument and would reach the attention
            # function as an unknown keyword; it must not be silently ignored.
            with pytest.raises(TypeError, match="pass the WeightedKVCache as past_key_values="):
                model(ids, cache=WeightedKVCache(budget=64))
            return
        b = model(ids, cache=WeightedKVCache(budget=64)).logits
        gen = dict(max_new_tokens=5, do_sample=False)
        g1 = model.generate(ids, past_key_values=WeightedKVCache(budget=16, sinks=2), **gen)
        g2 = model.generate(ids, cache=WeightedKVCache(budget=16, sinks=2), **gen)
    torch.testing.assert_close(a, b)
    assert torch.equal(g1, g2)


def test_as_kwargs_uses_the_installed_spelling_without_warnings():
    """``cache.as_kwargs()`` picks the keyword this transformers takes, so no FutureWarning fires and
    the cache is really used (the same logits as the explicit `past_key_values=` call)."""
    import warnings

    model, ids = tiny_llama(), tokens(20)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cache = WeightedKVCache(budget=8, sinks=2)
        a = model(ids, **cache.as_kwargs()).logits
        g = model.generate(ids, **WeightedKVCache(budget=8, sinks=2).as_kwargs(), max_new_tokens=3,
                           do_sample=False)
    assert int(cache.held_tokens().max()) == 8
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        b = model(ids, past_key_values=WeightedKVCache(budget=8, sinks=2)).logits
    torch.testing.assert_close(a, b)
    assert g.shape == (1, 23)


def test_beam_search_reorders_the_cache():
    model, sdpa, ids = tiny_llama(), tiny_llama(attn="sdpa"), tokens(20, batch=2)
    gen = dict(max_new_tokens=8, do_sample=False, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        expect = sdpa.generate(ids, **gen)
        got = model.generate(ids, past_key_values=WeightedKVCache(budget=64), **gen)
    assert torch.equal(got, expect)


def test_other_caches_fall_back_to_sdpa():
    model, sdpa, ids = tiny_llama(), tiny_llama(attn="sdpa"), tokens(30, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        for kw in (lambda: dict(past_key_values=DynamicCache()), lambda: dict(use_cache=False)):
            torch.testing.assert_close(model(ids, attention_mask=mask, **kw()).logits,
                                       sdpa(ids, attention_mask=mask, **kw()).logits)


def test_model_without_weightedkv_attention_is_reported():
    sdpa = tiny_llama(attn="sdpa")
    with pytest.raises(RuntimeError, match=r"weightedkv_ext\.enable\(model\)"):
        with torch.no_grad():
            sdpa(tokens(10), past_key_values=WeightedKVCache(budget=64))
    assert weightedkv_ext.enable(sdpa) is sdpa and sdpa.config._attn_implementation == "weightedkv"
    with torch.no_grad():
        sdpa(tokens(10), past_key_values=WeightedKVCache(budget=64))


# -- compression on: compiled ops == reference ---------------------------------------------------

@pytest.mark.parametrize("step", [1, 37], ids=["token_by_token", "chunks"])
@pytest.mark.parametrize("policy", COMPRESSING)
def test_compression_matches_reference_backend(policy, step):
    model, ids = tiny_llama(kv_heads=2), tokens(300, seed=1)
    budget = 32
    caches = {b: WeightedKVCache(budget, sinks=2, policy=policy, chunk_size=16, backend=b)
              for b in ("ops", "reference")}
    logits = {b: stream(model, ids, c, step, check_budget=budget) for b, c in caches.items()}
    torch.testing.assert_close(logits["ops"], logits["reference"], **LOGITS_TOL)
    for lo, lr in zip(caches["ops"].layers, caches["reference"].layers):
        assert torch.equal(lo.slot_pos.sort(-1).values, lr.slot_pos.sort(-1).values)
    assert caches["ops"].held_tokens().eq(budget).all()


def test_compression_mha_and_group_reduce():
    model, ids = tiny_llama(kv_heads=4), tokens(120, seed=2)
    for group_reduce in ("mean", "max"):
        caches = [WeightedKVCache(24, chunk_size=8, backend=b, group_reduce=group_reduce)
                  for b in ("ops", "reference")]
        a, b = (stream(model, ids, c, step=13, check_budget=24) for c in caches)
        torch.testing.assert_close(a, b, **LOGITS_TOL)


def test_absolute_positions_with_and_without_position_ids():
    model, ids = tiny_llama(), tokens(150, seed=3)
    a = stream(model, ids, WeightedKVCache(32, chunk_size=16), step=11)
    b = stream(model, ids, WeightedKVCache(32, chunk_size=16), step=11, explicit_positions=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    cache = WeightedKVCache(32, chunk_size=16)
    stream(model, ids, cache, step=11)
    assert cache.get_seq_length() == 150
    assert all(int(layer.slot_pos.max()) == 149 for layer in cache.layers)


# -- batches with padding ---------------------------------------------------------------------

def _left_pad(seqs):
    T = max(s.shape[1] for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - s.shape[1]:] = s[0]
        mask[b, T - s.shape[1]:] = 1
    return ids, mask


PAD_TOL = dict(rtol=1e-5, atol=1e-5)  # same computation, only fp32 rounding differs
PAD_LENGTHS = (300, 170, 45)  # > several chunks; the last row is all padding in most chunks
PAD_KW = dict(budget=64, sinks=2, chunk_size=32)


def _held_positions(cache, b):
    """Sorted held positions of batch row b, per (layer, KV head) (capacities may differ: the
    slots grow with the tokens held)."""
    return [p[p >= 0].sort().values for layer in cache.layers for p in layer.slot_pos[b]]


def _assert_same_held(batch_cache, b, alone_cache, row):
    got, want = _held_positions(batch_cache, b), _held_positions(alone_cache, row)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def _alone(seq, b):
    """The sequence unpadded as batch row b (b + 1 copies): CaM's random draw is keyed by the
    batch row, so a row is compared with the same sequence at the same row index."""
    return seq.expand(b + 1, -1)


@pytest.mark.parametrize("policy", COMPRESSING)
def test_left_padded_batch_equals_per_sequence_runs(policy):
    model = tiny_llama()
    seqs = [tokens(n, seed=10 + n) for n in PAD_LENGTHS]
    steps = tokens(4, batch=3, seed=4)  # fixed decode tokens (no argmax divergence)
    kw = dict(PAD_KW, policy=policy)
    ids, mask = _left_pad(seqs)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() builds them
    batch_cache = WeightedKVCache(**kw)
    with torch.no_grad():
        prompt = model(ids, attention_mask=mask, position_ids=pos,
                       past_key_values=batch_cache).logits
        decode = []
        for t in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
            decode.append(model(steps[:, t:t + 1], attention_mask=mask, position_ids=pos,
                                past_key_values=batch_cache).logits)
    decode = torch.cat(decode, 1)
    for b, s in enumerate(seqs):
        single = WeightedKVCache(**kw)
        n = s.shape[1]
        torch.testing.assert_close(prompt[b, -n:], stream(model, _alone(s, b), single, step=n)[b],
                                   **PAD_TOL)
        step_ids = _alone(steps[b:b + 1], b)
        torch.testing.assert_close(decode[b], stream(model, step_ids, single, step=1)[b],
                                   **PAD_TOL)
        _assert_same_held(batch_cache, b, single, b)
    held = batch_cache.held_tokens()  # [layers, B, H]
    for b, n in enumerate(PAD_LENGTHS):
        assert held[:, b].eq(min(kw["budget"], n + steps.shape[1])).all()


def test_generate_with_left_padding_equals_per_sequence():
    model = tiny_llama()
    seqs = [tokens(n, seed=20 + n) for n in PAD_LENGTHS]
    ids, mask = _left_pad(seqs)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
               output_logits=True)
    with torch.no_grad():
        batch_cache = WeightedKVCache(**PAD_KW)
        got = model.generate(ids, attention_mask=mask, past_key_values=batch_cache, **gen)
        for b, s in enumerate(seqs):
            single = WeightedKVCache(**PAD_KW)
            alone = model.generate(s, past_key_values=single, **gen)
            n = len(alone.logits)  # a single sequence stops at its EOS, the batch goes on
            assert torch.equal(got.sequences[b, ids.shape[1]:][:n], alone.sequences[0, s.shape[1]:])
            torch.testing.assert_close(torch.stack(got.logits[:n])[:, b],
                                       torch.stack(alone.logits)[:, 0], **PAD_TOL)
            if n == gen["max_new_tokens"]:  # same tokens seen: same slots held
                _assert_same_held(batch_cache, b, single, 0)


# -- concurrency, memory bound, dtypes ----------------------------------------------------------

def test_two_threads_two_models_two_caches():
    models = [tiny_llama(kv_heads=2, seed=5), tiny_llama(kv_heads=4, seed=6)]
    ids = [tokens(200, seed=7), tokens(200, seed=8)]

    def run(i):
        return stream(models[i], ids[i], WeightedKVCache(32, chunk_size=16), step=7)

    expect = [run(0), run(1)]
    got = [None, None]
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, run(i))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_long_prefill_runs_in_chunks_of_bounded_size():
    model, ids = tiny_llama(), tokens(1000, seed=9)
    cache = WeightedKVCache(64, chunk_size=128)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache).logits
        model(tokens(1, seed=10), past_key_values=cache)
    assert torch.isfinite(logits).all()
    for layer in cache.layers:
        assert layer.capacity == 64 + 128
        assert layer.peak_block == 128 * (64 + 128)  # one chunk x slots block, never 1000 x 1000
    assert cache.held_tokens().eq(64).all() and cache.get_seq_length() == 1001


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_models(dtype):
    model, ids = tiny_llama(dtype=dtype), tokens(120, seed=11)
    ref32 = stream(tiny_llama(), ids, WeightedKVCache(256), step=120)  # no eviction, fp32
    cache = WeightedKVCache(256, chunk_size=16)
    half = stream(model, ids, cache, step=40)
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), ref32, rtol=0.1, atol=0.1)
    caches = [WeightedKVCache(32, chunk_size=16, backend=b) for b in ("ops", "reference")]
    a, b = (stream(model, ids, c, step=9, check_budget=32) for c in caches)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
    layer = caches[0].layers[0]
    assert layer.keys.dtype == dtype and layer.values.dtype == dtype
    assert {t.dtype for t in (layer.scores, layer.counts, layer.last)} == {torch.float32}
