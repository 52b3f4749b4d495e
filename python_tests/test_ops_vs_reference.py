"""Compiled ops == the pure-PyTorch reference, op by op, on random cache states.

Both implementations get the same inputs (contiguous or as strided views). append, accumulate and
compress follow the contract's float32 formulas literally on both sides (no FMA contraction, fixed
summation order), so their results must match bit for bit, in every dtype; decode_attention (dot
products, exp) matches within a per-dtype tolerance, with exact counts.
"""
import pytest
import torch

from helpers import (DTYPE_IDS, DTYPES, TOL, assert_states_equal, compiled_ops, layout,
                     random_state, ref, state_copy, stream)

POLICIES = ref.POLICIES


def run_both(fn_name, make_args, strided):
    """Call op fn_name of both implementations on layout copies of make_args(); return both args."""
    ops = compiled_ops()
    base = make_args()
    results = []
    for module in (ref, ops):
        args = [layout(a, strided) if isinstance(a, torch.Tensor) else a for a in base[0]]
        out = getattr(module, fn_name)(*args, **base[1])
        results.append((args, out))
    return results


# ---------------------------------------------------------------------------------------------
# append


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("B,D", [(1, 64), (3, 59)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_append(dtype, B, D, strided):
    H, C, T = 2, 12, 5

    def make():
        st = random_state(B, H, C, D, dtype, held=lambda b, h: (3 * b + h) % 7, seed=1)
        g = torch.Generator().manual_seed(2)
        nk = torch.randn(B, H, T, D, generator=g).to(dtype)
        nv = torch.randn(B, H, T, D, generator=g).to(dtype)
        rows = [[40, 41, 42, 43, 44], [-1, -1, 7, 8, 9], [-1, -1, -1, -1, -1]]
        return (*st, nk, nv, torch.tensor(rows[:B])), {}

    (want, _), (got, _) = run_both("append", make, strided)
    for w, g in zip(want[:6], got[:6]):
        assert torch.equal(g, w)


# ---------------------------------------------------------------------------------------------
# accumulate


def query_positions(B, Q, C):
    rows = [
        torch.linspace(0, 3 * C, Q).long().tolist()[:-1] + [-1],  # last query is padding
        [-1, -1] + list(range(C, C + Q - 2)),  # left padding
        [-1] * Q,  # all padding: nothing changes, not even `last`
    ]
    return torch.tensor(rows[:B])


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("reduce", ["mean", "sum", "max"])
@pytest.mark.parametrize("B,G", [(1, 1), (3, 3), (3, 4)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_accumulate(dtype, B, G, reduce, strided):
    H, C, Q = 2, 13, 6

    def make():
        st = random_state(B, H, C, 4, torch.float32, held=lambda b, h: 5 + 4 * h, seed=3)
        g = torch.Generator().manual_seed(4)
        probs = torch.rand(B, H * G, Q, C, generator=g)
        probs[probs < 0.2] = 0.0  # zeros
        probs[..., :3] = 0.25  # ties
        qpos = query_positions(B, Q, C)
        return (probs.to(dtype), st.slot_pos, qpos, st.scores, st.counts, st.last), \
            dict(group_reduce=reduce)

    (want, _), (got, _) = run_both("accumulate", make, strided)
    for name, w, g in zip(("slot_pos", "scores", "counts", "last"), want[1:], got[1:]):
        assert torch.equal(g, w), name


# ---------------------------------------------------------------------------------------------
# decode_attention

OUT_TOL = {**TOL, torch.float32: dict(rtol=1e-5, atol=1e-6)}


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("B,G,D", [(1, 1, 64), (3, 3, 59), (3, 4, 128)])
@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_attention(dtype, reduce, B, G, D, strided):
    H, C = 2, 11

    def make():
        st = random_state(B, H, C, D, dtype, held=lambda b, h: 4 + 3 * h, seed=5)
        g = torch.Generator().manual_seed(6)
        query = torch.randn(B, H * G, D, generator=g).to(dtype)
        qpos = torch.tensor([3 * C, C, -1][:B])  # sees all / causal cut / padding row
        return (query, st.keys, st.values, st.slot_pos, qpos, st.scores, st.counts, st.last,
                D ** -0.5), dict(group_reduce=reduce)

    (want, out_want), (got, out_got) = run_both("decode_attention", make, strided)
    assert out_got.shape == out_want.shape and out_got.dtype == dtype
    torch.testing.assert_close(out_got, out_want, **OUT_TOL[dtype])
    assert torch.equal(got[6], want[6])  # counts
    torch.testing.assert_close(got[5], want[5], rtol=1e-5, atol=1e-7)  # scores
    torch.testing.assert_close(got[7], want[7], rtol=1e-5, atol=1e-7)  # last


# ---------------------------------------------------------------------------------------------
# compress

SCENARIOS = {
    # name: B, H, C, D, budget, sinks, recent, k removed (rows with (b + h) % 3 == 0 hold
    # budget - 1 tokens and lose none), cam_window, seed, strided
    "k1": (1, 2, 24, 64, 8, 2, 3, 1, 16, 0, False),
    "k7-sinks0": (3, 2, 30, 59, 12, 0, 4, 7, 3, 1, True),
    "k5-recent0": (3, 3, 20, 128, 6, 2, 0, 5, 16, 2, False),
    "k30-none": (1, 1, 40, 59, 5, 0, 0, 30, 4, -7, True),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_compress(policy, dtype, scenario):
    B, H, C, D, budget, sinks, recent, k, window, seed, strided = SCENARIOS[scenario]

    def make():
        held = lambda b, h: budget - 1 if (b + h) % 3 == 0 and B * H > 1 else budget + k  # noqa
        st = random_state(B, H, C, D, dtype, held=held, seed=7 + k)
        return (*st, budget, sinks, recent, policy), dict(cam_window=window, seed=seed)

    (want, _), (got, _) = run_both("compress", make, strided)
    assert_states_equal(got[:6], want[:6])



@pytest.mark.parametrize("policy", POLICIES)
def test_compress_all_ties_and_zero_scores(policy):
    """Every key equal (all zero): the oldest eligible token goes first, for every policy."""
    st = random_state(2, 2, 16, 8, torch.float32, held=14, seed=8)
    for t in (st.scores, st.counts, st.last):
        t.zero_()
    want, got = state_copy(st), state_copy(st)
    ref.compress(*want, 6, 1, 2, policy)
    compiled_ops().compress(*got, 6, 1, 2, policy)
    assert_states_equal(got, want)
    for b in range(2):
        for h in range(2):
            before = ref.held_in_order(st, b, h).positions.tolist()
            kept = ref.held_in_order(got, b, h).positions.tolist()
            assert kept == before[:1] + before[9:]  # sink, then the newest 5 (2 recent + 3)


def test_compress_newest_token_without_right_neighbour_is_dropped():
    """recent = 0: WeightedKV may choose the newest token; with no right neighbour it is dropped."""
    st = random_state(1, 2, 8, 8, torch.float32, held=6, seed=9)
    newest = st.slot_pos.argmax(-1)
    for h in range(2):
        st.scores[0, h] = 1.0
        st.counts[0, h] = 1.0
        st.scores[0, h, newest[0, h]] = 0.0  # lowest average
    want, got = state_copy(st), state_copy(st)
    ref.compress(*want, 5, 0, 0, "weightedkv")
    compiled_ops().compress(*got, 5, 0, 0, "weightedkv")
    assert_states_equal(got, want)
    assert torch.equal(got.values, st.values)  # nothing merged
    assert (got.slot_pos.max(-1).values < st.slot_pos.max(-1).values).all()


@pytest.mark.parametrize("policy", ["weightedkv", "evict", "h2o", "tova", "cam"])
def test_compress_nan_and_inf_statistics(policy):
    """NaN keys count as the lowest (like torch.argmin); NaN/inf merge weights -> equal weights."""
    st = random_state(2, 2, 16, 8, torch.float32, held=14, seed=10)
    st.scores[0, 0, st.slot_pos[0, 0] >= 0] = float("nan")
    st.scores[0, 1, 3] = float("nan")
    st.scores[1, 0, 5] = float("inf")
    st.last[1, 1, 2] = float("nan")
    want, got = state_copy(st), state_copy(st)
    ref.compress(*want, 7, 1, 1, policy)
    compiled_ops().compress(*got, 7, 1, 1, policy)
    assert_states_equal(got, want)


@pytest.mark.parametrize("policy", POLICIES)
def test_stream_matches_reference(policy):
    """append -> accumulate -> compress over a stream with padding: identical final caches."""
    want = stream(ref, policy, steps=12, dtype=torch.bfloat16, seed=1)
    got = stream(compiled_ops(), policy, steps=12, dtype=torch.bfloat16, seed=1)
    assert_states_equal(got, want)


def _thread_run(threads: int) -> None:
    """Body of test_results_do_not_depend_on_thread_count, in a subprocess: prints a digest."""
    import hashlib
    torch.set_num_threads(threads)
    ops = compiled_ops()
    st = random_state(4, 64, 40, 8, torch.float16, held=lambda b, h: 20 + (b * h) % 17, seed=12)
    g = torch.Generator().manual_seed(13)  # inputs identical in both processes
    probs = torch.rand(4, 128, 2, 40, generator=g)
    qpos = torch.tensor([[50, 130]] * 4)
    query = torch.randn(4, 128, 8, generator=g).half()
    s = state_copy(st)
    ops.accumulate(probs, s.slot_pos, qpos, s.scores, s.counts, s.last)
    out = ops.decode_attention(query, s.keys, s.values, s.slot_pos, qpos[:, 1], s.scores,
                               s.counts, s.last, 0.3)
    ob = ops.block_attention(query[:, :, None].expand(4, 128, 2, 8), s.keys, s.values,
                             s.slot_pos, qpos, s.scores, s.counts, s.last, 0.3, window=30)
    ops.compress(*s, 12, 2, 2, "weightedkv")
    c = state_copy(st)
    ops.compress(*c, 12, 2, 2, "cam")
    r = state_copy(st)
    ref.compress(*r, 12, 2, 2, "cam")
    assert_states_equal(c, r)
    h = hashlib.sha256()
    for t in (*s, out, ob, *c):
        h.update(t.contiguous().view(torch.uint8 if t.dtype != torch.int64 else torch.int64)
                 .numpy().tobytes())
    print("digest=" + h.hexdigest())


def test_results_do_not_depend_on_thread_count():
    """256 (b, h) rows, each its own task (WKV_TEST_TASK_WORK=1: the kernels' grain would run
    these shapes inline), so 2 threads really split every op; 1 thread == 2 threads bit for bit,
    and compress == the reference. Fresh processes: the thread pool is sized once."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    here = Path(__file__).resolve().parent
    digests = []
    for n in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(n), WKV_TEST_TASK_WORK="1",
                   OMP_WAIT_POLICY="PASSIVE",
                   PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
        res = subprocess.run([sys.executable, "-c", "import test_ops_vs_reference as t; "
                              f"t._thread_run({n})"], env=env, cwd=here, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        digests.append(res.stdout.split("digest=")[1].split()[0])
    assert digests[0] == digests[1]
