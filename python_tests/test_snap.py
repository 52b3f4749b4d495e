"""The "snapkv" prompt mode: ops.snap_compress vs the reference, the engine/cache mode, errors."""
from __future__ import annotations

import pytest
import torch

from helpers import DTYPE_IDS, DTYPES, compiled_ops, random_state, ref, state_copy

ops = compiled_ops()
import weightedkv_ext  # noqa: E402
from weightedkv_ext import prompt  # noqa: E402
from weightedkv_ext.engine import KVEngine  # noqa: E402


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


# -- the op vs the reference ------------------------------------------------------------------


def _held_counts(b, h):
    return [0, 5, 9, 17, 24][(3 * b + h) % 5]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("merge", [False, True], ids=["drop", "merge"])
@pytest.mark.parametrize("pool", [1, 3, 7])
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
def test_snap_compress_matches_reference(dtype, merge, pool, strided):
    st = random_state(2, 3, 24, 8, dtype, _held_counts, seed=pool + 10 * merge)
    want = state_copy(st)
    got = state_copy(st, strided)
    kept_want = ref.snap_compress(*want, 9, 2, 3, pool, merge)
    kept_got = ops.snap_compress(*got, 9, 2, 3, pool, merge)
    assert torch.equal(kept_got, kept_want)
    for name, a, b in zip(ref.State._fields, got, want):
        assert torch.equal(a, b), name  # same float32 formulas, same order: bit-identical
    held = (got.slot_pos >= 0).sum(-1)
    assert int(held.max()) <= 9


def test_snap_compress_tie_order_and_protected_tokens():
    # 12 held tokens, equal window scores: the oldest eligible tokens win the ties; the sinks and
    # the window (recent) are always kept, whatever their score.
    st = ref.new_state(1, 1, 12, 2)
    st.slot_pos[0, 0] = torch.arange(12).flip(0) * 10  # slots in reverse position order
    st.scores[0, 0] = 1.0
    st.scores[0, 0, 0] = 0.0  # the newest token (position 110): in the window, kept anyway
    st.scores[0, 0, 3] = 5.0  # position 80: kept first
    st.counts[0, 0] = 1.0
    kept = ops.snap_compress(*st, 6, 1, 2, 1, False)
    assert kept[0, 0, :6].tolist() == [11, 10, 9, 3, 1, 0]  # slots of positions 0,10,20,80,100,110
    assert (kept[0, 0, 6:] == -1).all()
    assert sorted(st.slot_pos[0, 0][st.slot_pos[0, 0] >= 0].tolist()) == [0, 10, 20, 80, 100, 110]


def test_snap_compress_pooling_keeps_neighbours_of_a_peak():
    # One peak at rank 5: pooling over 3 spreads it to ranks 4 and 6, which then beat the rest.
    st = ref.new_state(1, 1, 16, 2)
    st.slot_pos[0, 0] = torch.arange(16)
    st.counts[0, 0] = 1.0
    st.scores[0, 0] = 0.01
    st.scores[0, 0, 5] = 1.0
    st.scores[0, 0, 9] = 0.4  # alone: pooled 0.146 < the peak's neighbours' 0.34
    kept = ops.snap_compress(*state_copy(st), 6, 1, 2, 3, False)
    assert kept[0, 0, :6].tolist() == [0, 4, 5, 6, 14, 15]
    kept1 = ops.snap_compress(*state_copy(st), 6, 1, 2, 1, False)  # no pooling: the two peaks
    assert kept1[0, 0, :6].tolist() == [0, 1, 5, 9, 14, 15]  # rank 1: the oldest of the ties


def test_snap_compress_merge_is_the_weighted_mean_of_the_run():
    st = ref.new_state(1, 1, 6, 1)
    st.slot_pos[0, 0] = torch.arange(6)
    st.values[0, 0, :, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    st.scores[0, 0] = torch.tensor([1.0, 0.1, 0.2, 0.3, 1.0, 1.0])
    st.counts[0, 0] = 1.0
    ops.snap_compress(*st, 3, 1, 1, 1, True)  # keeps 0, 4 (best eligible), 5; drops 1..3
    w = torch.tensor([0.1, 0.2, 0.3, 1.0])
    expect = float((w * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum() / w.sum())
    assert st.values[0, 0, 4, 0].item() == pytest.approx(expect, rel=1e-6)
    assert st.values[0, 0, 5, 0].item() == 5.0 and st.values[0, 0, 0, 0].item() == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=5, sinks=2, recent=3), "snap_compress: budget must exceed sinks \\+ recent"),
    (dict(pool=4), "snap_compress: pool must be an odd int"),
    (dict(pool=0), "snap_compress: pool must be an odd int"),
    (dict(sinks=-1), "snap_compress: sinks must be >= 0"),
])
@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_snap_compress_errors_name_the_argument(kwargs, match, impl):
    st = random_state(1, 2, 8, 4, torch.float32, 6, seed=0)
    before = state_copy(st)
    args = dict(budget=6, sinks=1, recent=2, pool=3, merge=False) | kwargs
    mod = ops if impl == "ops" else ref
    with pytest.raises((RuntimeError, ValueError), match=match):
        mod.snap_compress(*st, **args)
    for a, b in zip(st, before):
        assert torch.equal(a, b)


def test_snap_compress_kept_must_fit():
    st = random_state(1, 2, 8, 4, torch.float32, 6, seed=0)
    with pytest.raises(RuntimeError, match="snap_compress: kept must have shape"):
        ops.snap_compress(*st, 6, 1, 2, 3, False, kept=torch.empty(1, 2, 7, dtype=torch.int64))


def test_snap_compress_opcheck():
    st = random_state(2, 2, 12, 4, torch.float32, lambda b, h: 10 - 3 * h, seed=1)
    kept = torch.empty(2, 2, 12, dtype=torch.int64)
    torch.library.opcheck(torch.ops.weightedkv.snap_compress, (*st, 6, 1, 2, 3, True),
                          {"kept": kept})


# -- the engine --------------------------------------------------------------------------------


def _qkv(B=2, Hq=4, H=2, T=40, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, T, D, generator=g), torch.randn(B, H, T, D, generator=g),
            torch.randn(B, H, T, D, generator=g))


@pytest.mark.parametrize("policy", ["weightedkv", "evict", "tova"])
def test_budget_above_the_prompt_changes_nothing(policy):
    q, k, v = _qkv()
    full = KVEngine(None, policy="full", chunk_size=8)
    snap = KVEngine(64, policy=policy, chunk_size=8, prompt_mode="snapkv", prompt_window=4)
    assert torch.equal(snap.attend(q, k, v), full.attend(q, k, v))
    for t in range(5):
        q1, k1, v1 = _qkv(T=1, seed=100 + t)
        assert torch.equal(snap.attend(q1, k1, v1), full.attend(q1, k1, v1))
    assert torch.equal(torch.sort(snap.slot_pos, -1).values[..., -45:],
                       torch.sort(full.slot_pos, -1).values[..., -45:])


def _needle_prompt(T=48, needle=6, W=4, D=4, s=12.0):
    """One row, one head: a needle key no prompt query looks at, and a window of queries that
    look only at it."""
    q = torch.zeros(1, 1, T, D)
    k = torch.zeros(1, 1, T, D)
    v = torch.zeros(1, 1, T, D)
    k[..., 1] = 1.0  # every token looks like "filler"
    q[..., 1] = s  # prompt queries attend to filler
    k[0, 0, needle] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    v[0, 0, needle] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    q[0, 0, T - W:] = torch.tensor([s, 0.0, 0.0, 0.0])  # the question asks for the needle
    return q, k, v


@pytest.mark.parametrize("backend", ["ops", "reference"])
def test_needle_unseen_during_the_prompt_is_kept_by_snapkv_and_lost_by_evict(backend):
    q, k, v = _needle_prompt()
    common = dict(budget=16, sinks=2, recent=4, chunk_size=8, backend=backend)
    evict = KVEngine(policy="evict", **common)
    snap = KVEngine(policy="evict", prompt_mode="snapkv", prompt_window=4, **common)
    evict.attend(q, k, v)
    snap.attend(q, k, v)
    assert 6 not in evict.slot_pos.flatten().tolist()
    assert 6 in snap.slot_pos.flatten().tolist()
    assert int(snap.held_tokens().max()) <= 16
    assert snap.capacity == 16 + 8  # shrunk to the decoding limit after the prompt
    ask = torch.tensor([12.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    zero = torch.zeros(1, 1, 1, 4)
    assert snap.attend(ask, zero, zero)[0, 0, 0, 2] > 0.9  # the needle's value is read back
    assert evict.attend(ask, zero, zero)[0, 0, 0, 2] < 0.01


def test_snapkv_matches_the_reference_backend():
    q, k, v = _qkv(T=37)
    kw = dict(budget=12, sinks=1, chunk_size=5, prompt_mode="snapkv", prompt_window=3,
              prompt_pool=3, prompt_merge=True)
    a, b = KVEngine(backend="ops", **kw), KVEngine(backend="reference", **kw)
    torch.testing.assert_close(a.attend(q, k, v), b.attend(q, k, v))
    for t in range(3):
        q1, k1, v1 = _qkv(T=1, seed=50 + t)
        torch.testing.assert_close(a.attend(q1, k1, v1), b.attend(q1, k1, v1))
    assert torch.equal(a.slot_pos, b.slot_pos)


def test_padded_batch_rows_equal_their_solo_runs():
    q, k, v = _qkv(B=2, T=30, seed=3)
    real = torch.ones(2, 30, dtype=torch.bool)
    real[1, :7] = False  # row 1: 7 left-padding tokens
    kw = dict(budget=12, sinks=1, chunk_size=4, prompt_mode="snapkv", prompt_window=3,
              prompt_pool=3, prompt_merge=True)
    batch = KVEngine(**kw)
    out = batch.attend(q, k, v, real=real)
    solos = []
    for b, start in ((0, 0), (1, 7)):
        solo = KVEngine(**kw)
        o = solo.attend(q[b:b + 1, :, start:], k[b:b + 1, :, start:], v[b:b + 1, :, start:])
        torch.testing.assert_close(out[b:b + 1, :, start:], o, rtol=1e-5, atol=1e-6)
        assert (out[b, :, :start] == 0).all()
        solos.append(solo)
    def held(e, r, h):
        return sorted(e.slot_pos[r, h][e.slot_pos[r, h] >= 0].tolist())

    for step in range(3):  # decoding after the prompt
        q1, k1, v1 = _qkv(B=2, T=1, seed=70 + step)
        ob = batch.attend(q1, k1, v1)
        for b, solo in enumerate(solos):
            torch.testing.assert_close(ob[b:b + 1], solo.attend(q1[b:b + 1], k1[b:b + 1],
                                                                v1[b:b + 1]),
                                       rtol=1e-5, atol=1e-6)
            for h in range(2):
                assert held(batch, b, h) == held(solo, 0, h)


def test_manual_end_after_chunked_prefill_equals_first_forward():
    q, k, v = _qkv(T=40, seed=5)
    kw = dict(budget=12, sinks=1, chunk_size=8, prompt_mode="snapkv", prompt_window=4)
    auto = KVEngine(**kw)
    manual = KVEngine(prompt_end="manual", **kw)
    auto.attend(q, k, v)
    for s in range(0, 40, 16):  # chunked prefill: nothing compressed until end_prompt()
        manual.attend(q[:, :, s:s + 16], k[:, :, s:s + 16], v[:, :, s:s + 16])
    assert int(manual.held_tokens().min()) == 40
    manual.end_prompt()
    assert torch.equal(manual.slot_pos, auto.slot_pos)
    assert torch.equal(manual.values, auto.values) and torch.equal(manual.scores, auto.scores)


def test_prompt_budget_bounds_the_prompt():
    q, k, v = _qkv(T=64, seed=6)
    e = KVEngine(12, sinks=1, chunk_size=8, prompt_mode="snapkv", prompt_window=4,
                 prompt_budget=32, prompt_end="manual")
    e.attend(q, k, v)
    assert int(e.held_tokens().max()) == 32 and e.capacity <= 32 + 8
    e.end_prompt()
    assert int(e.held_tokens().max()) == 12


def test_statistics_after_the_prompt_are_the_windows():
    q, k, v = _qkv(T=20, seed=8)
    e = KVEngine(64, chunk_size=8, prompt_mode="snapkv", prompt_window=3)
    e.attend(q, k, v)
    held = e.slot_pos >= 0
    assert float(e.counts[held].max()) == 3.0  # only the 3 window queries are counted


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_mode="snap"), "prompt_mode must be one of"),
    (dict(prompt_pool=4), "prompt_pool must be odd"),
    (dict(prompt_window=0), "prompt_window must be an int >= 1"),
    (dict(prompt_window=60), "budget must exceed sinks \\+ prompt_window"),
    (dict(prompt_budget=50), "prompt_budget must exceed budget"),
    (dict(prompt_merge="yes"), "prompt_merge must be a bool"),
    (dict(prompt_end="never"), "prompt_end must be one of"),
])
def test_option_errors_name_the_option(kwargs, match):
    opts = dict(prompt_mode="snapkv") | kwargs
    with pytest.raises(ValueError, match="^KVEngine: .*" + match):
        KVEngine(64, **opts)
    with pytest.raises(ValueError, match="^WeightedKVCache: .*" + match):
        weightedkv_ext.WeightedKVCache(64, **opts)


def test_cache_rejects_unknown_prompt_options():
    with pytest.raises(TypeError, match="prompt_windows"):
        weightedkv_ext.WeightedKVCache(32, prompt_windows=4)
    with pytest.raises(TypeError, match="^KVEngine: unexpected keyword argument 'prompt_windows'"):
        KVEngine(32, prompt_windows=4)


def test_defaults_are_prompt_options():
    """prompt.OPTIONS is the one table of defaults: the engine's, the op's and the harness's read
    it; the reference keeps its deliberate copy, which must equal it."""
    import inspect

    from weightedkv_ext.eval.caches import CacheOptions

    e = KVEngine(64)
    assert {k: getattr(e, k) for k in prompt.OPTIONS} == prompt.OPTIONS
    for fn in (ops.snap_compress, ref.snap_compress):
        sig = inspect.signature(fn).parameters
        assert (sig["pool"].default, sig["merge"].default) == \
            (prompt.OPTIONS["prompt_pool"], prompt.OPTIONS["prompt_merge"]), fn
    options = CacheOptions(chunk_size=1)
    assert options.prompt_pool == prompt.OPTIONS["prompt_pool"]
    assert options.prompt_window == prompt.OPTIONS["prompt_window"]


def test_stream_mode_is_the_default_and_unchanged():
    assert prompt.OPTIONS["prompt_mode"] == "stream"
    q, k, v = _qkv(T=30, seed=9)
    a = KVEngine(12, chunk_size=4)
    b = KVEngine(12, chunk_size=4, prompt_mode="stream", prompt_window=3)
    assert torch.equal(a.attend(q, k, v), b.attend(q, k, v))
    assert torch.equal(a.slot_pos, b.slot_pos)


# -- transformers ------------------------------------------------------------------------------


def _tiny():
    from test_validation_cache import tiny_llama
    return tiny_llama()


def test_generate_in_snapkv_mode_equals_full_when_the_budget_covers_it():
    model = _tiny()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    full = weightedkv_ext.WeightedKVCache(None, policy="full")
    snap = weightedkv_ext.WeightedKVCache(48, sinks=1, chunk_size=8, prompt_mode="snapkv",
                                          prompt_window=4)
    with torch.no_grad():
        a = model.generate(ids, **full.as_kwargs(), **gen)
        b = model.generate(ids, **snap.as_kwargs(), **gen)
    assert torch.equal(a, b)


def test_generate_ends_the_prompt_after_the_prefill():
    model = _tiny()
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(2))
    snap = weightedkv_ext.WeightedKVCache(16, sinks=1, chunk_size=8, prompt_mode="snapkv",
                                          prompt_window=4)
    with torch.no_grad():
        model(ids, **snap.as_kwargs())  # the prefill: every layer ends its prompt
    assert int(snap.held_tokens().max()) == 16
    for layer in snap.layers:
        assert not layer.engine._prompt.active
        assert layer.engine.counts[layer.engine.slot_pos >= 0].max() <= 4


# -- CUDA (skips without a GPU) ------------------------------------------------------------------


def test_cuda_build_registers_snap_compress():
    from weightedkv_ext import _loader
    if not _loader.cuda_built():
        pytest.skip("weightedkv_ext was built without the CUDA kernels")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("weightedkv::snap_compress", "CUDA")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("merge", [False, True], ids=["drop", "merge"])
def test_cuda_snap_compress_equals_cpu(cuda_ops, dtype, merge):
    # The same float formulas (no FMA) on both devices: bit-identical results.
    st = random_state(3, 2, 40, 16, dtype, lambda b, h: [0, 7, 23, 40][(b + 2 * h) % 4], seed=4)
    cpu = state_copy(st)
    gpu = ref.State(*(t.cuda() for t in st))
    kept_cpu = ops.snap_compress(*cpu, 12, 2, 4, 5, merge)
    kept_gpu = cuda_ops.snap_compress(*gpu, 12, 2, 4, 5, merge)
    assert torch.equal(kept_gpu.cpu(), kept_cpu)
    for name, a, b in zip(ref.State._fields, gpu, cpu):
        assert torch.equal(a.cpu(), b), name
