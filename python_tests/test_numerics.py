"""Numerical edge cases of the ops (docs/design.md, "Numerical edge cases").

Zero, tied and underflowing statistics, one eligible slot, head_dim 4096, fp16/bf16/fp32 values
at the top of their range, NaN/inf in keys, values, probabilities, queries and statistics. The
compiled ops are compared with the reference wherever the contract fixes the result, and with the
documented behaviour (computed independently here) where only that is specified. NaN/inf must
never leave the (batch row, KV head) it entered: every other row is bit-identical to a clean run.
"""
from __future__ import annotations

import pytest
import torch

from helpers import (DTYPE_IDS, DTYPES, TOL, assert_states_equal, compiled_ops, random_state, ref,
                     state_copy)

KEYED = ("weightedkv", "evict", "h2o", "tova")  # policies choosing by a statistic
FP16_MAX = torch.finfo(torch.float16).max
FLOAT_MAX = torch.finfo(torch.float32).max
# The largest magnitude per K/V dtype that float32 arithmetic with weights summing to 1 (up to a few
# float32 roundings) cannot push past the float32 range: fp16/bf16 maxima are far enough below
# FLT_MAX; for fp32 itself values within ~1e-6 of FLT_MAX may round to inf (docs/design.md).
TOP = {torch.float16: FP16_MAX, torch.bfloat16: torch.finfo(torch.bfloat16).max,
       torch.float32: FLOAT_MAX * (1 - 2 ** -16)}


def ops():
    return compiled_ops()


def run_compress(module, st, *args, **kw):
    out = state_copy(st)
    module.compress(*out, *args, **kw)
    return out


def held_positions(st, b, h):
    return ref.held_in_order(st, b, h).positions.tolist()


def uniform_stats(st, value: float, count: float = 1.0):
    """Every held token gets scores = value, counts = count, last = value."""
    held = st.slot_pos >= 0
    for t, v in ((st.scores, value), (st.counts, count), (st.last, value)):
        t.zero_()
        t[held] = v


# -- ties and zeros --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.0, -0.0, 0.25, 2.0 ** -149, 2.0 ** 100, 3e38],
                         ids=["zero", "negzero", "quarter", "subnormal", "big", "near-max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_identical_statistics_behave_like_streaming(dtype, value):
    """All keys equal: every keyed policy removes the oldest eligible tokens (the position
    tie-break), exactly like `streaming`. WeightedKV's merges then all use equal weights: for a
    common weight that is 0, a power of two (subnormal 2^-149 included) or so large that the sum
    overflows (3e38), the merged values are bit-identical to those of weight 1/2."""
    st = random_state(2, 3, 20, 16, dtype, held=17, seed=1)
    uniform_stats(st, value)
    streaming = run_compress(ops(), st, 7, 2, 3, "streaming")
    half = run_compress(ops(), st, 7, 2, 3, "weightedkv")
    uniform_stats(st, 0.5)
    half_ref = run_compress(ops(), st, 7, 2, 3, "weightedkv")
    uniform_stats(st, value)
    for policy in KEYED:
        got = run_compress(ops(), st, 7, 2, 3, policy)
        assert torch.equal(got.slot_pos, streaming.slot_pos), policy
        assert_states_equal(got, run_compress(ref, st, 7, 2, 3, policy))
    assert torch.equal(half.values, half_ref.values)


def test_negative_zero_ties_with_zero():
    st = random_state(1, 2, 12, 4, torch.float32, held=10, seed=2)
    uniform_stats(st, 0.0)
    mixed = state_copy(st)
    mixed.scores[0, :, ::2] = -0.0
    for policy in KEYED:
        assert_states_equal(run_compress(ops(), mixed, 4, 1, 1, policy).slot_pos[None],
                            run_compress(ops(), st, 4, 1, 1, policy).slot_pos[None])


# -- underflowing and overflowing merge weights ----------------------------------------------------

def merge_case(dtype, weights, values):
    """One (b, h) per weight pair (w_j <= w_r): tokens at positions 0, 1, 2 with averages w_j, w_r
    and 1; compressed with budget 2, no sinks, recent 1, position 0 merges into position 1."""
    B = len(weights)
    st = ref.new_state(B, 1, 4, values.shape[-1], dtype)
    for b, (wj, wr) in enumerate(weights):
        st.slot_pos[b, 0, :3] = torch.tensor([0, 1, 2])
        st.scores[b, 0, :3] = torch.tensor([wj, wr, 1.0])
        st.counts[b, 0, :3] = 1.0
        st.values[b, 0, :3] = values[b].to(dtype)
    return st


def expected_merge(st, weights):
    """(w_j v_j + w_r v_r) / (w_j + w_r) in float64 with the exact float32 weights."""
    out = []
    for b, (wj, wr) in enumerate(weights):
        wj, wr = torch.tensor(wj, dtype=torch.float32).double(), torch.tensor(wr).double()
        vj, vr = st.values[b, 0, 0].double(), st.values[b, 0, 1].double()
        out.append((wj * vj + wr * vr) / (wj + wr) if wj + wr > 0 else (vj + vr) / 2)
    return torch.stack(out)


TINY_WEIGHTS = [(1e-45, 1e-45), (1e-45, 3e-45), (2e-45, 1e-40), (1e-40, 1e-38), (0.0, 1e-45),
                (1e-30, 2e-30), (1e-21, 1e-20), (1e-45, 1.0), (1e38, 2e38), (3e38, 3e38)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tiny_and_huge_merge_weights_give_the_exact_weighted_mean(dtype):
    """Subnormal or huge (but finite-sum) averages: the merge is the weighted mean (to the K/V
    dtype's rounding), not the underflowed plain formula (which merges 0.3 and 0.3 into 0), and
    the reference's power-of-two weight scaling gives the kernels' result bit for bit."""
    g = torch.Generator().manual_seed(3)
    values = torch.randn(len(TINY_WEIGHTS), 3, 24, generator=g)
    values[0, :2] = 0.3  # the same value twice: the merge must give it back
    st = merge_case(dtype, TINY_WEIGHTS, values)
    got = run_compress(ops(), st, 2, 0, 1, "weightedkv")
    assert_states_equal(got, run_compress(ref, st, 2, 0, 1, "weightedkv"))
    assert (got.slot_pos[:, 0, 0] == -1).all() and (got.slot_pos[:, 0, 1] == 1).all()
    merged = got.values[:, 0, 1]
    want = expected_merge(st, TINY_WEIGHTS)
    tol = TOL[dtype] if dtype != torch.float32 else dict(rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(merged.double(), want.to(dtype).double(), **tol)
    assert torch.equal(merged[0], torch.full((24,), 0.3).to(dtype))
    lo = torch.minimum(st.values[:, 0, 0], st.values[:, 0, 1])
    hi = torch.maximum(st.values[:, 0, 0], st.values[:, 0, 1])
    assert ((merged >= lo) & (merged <= hi)).all()  # convex, even after rounding


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_normal_merge_weights_match_the_reference_bit_for_bit(dtype):
    """Power-of-two weight scaling changes nothing when nothing underflows: ops == reference for
    averages from 2^-20 to 64 (group_reduce='sum' gives averages above 1)."""
    g = torch.Generator().manual_seed(4)
    weights = [tuple(sorted(w)) for w in (torch.rand(40, 2, generator=g) * 26 - 20).exp2().tolist()]
    st = merge_case(dtype, weights, torch.randn(len(weights), 3, 16, generator=g) * 100)
    assert_states_equal(run_compress(ops(), st, 2, 0, 1, "weightedkv"),
                        run_compress(ref, st, 2, 0, 1, "weightedkv"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_of_values_at_the_top_of_the_range_stays_finite(dtype):
    """WeightedKV's merge is a convex combination computed with weights scaled into [1/2, 1):
    values at +-max of their dtype (fp16 65504, bf16 ~3.39e38; fp32 just below FLT_MAX) never
    overflow, whatever the weights (also sums > 1 from group_reduce='sum')."""
    top = TOP[dtype]
    weights = [(1.0, 1.0), (3.0, 4.0), (0.5, 0.5), (1e-45, 1e-45), (0.0, 0.0), (1e-3, 3.0)]
    values = torch.full((len(weights), 3, 8), top)
    values[:, :, 1::2] = -top
    values[:, 0, :4] = top * 0.75
    st = merge_case(dtype, weights, values.to(dtype).float())
    got = run_compress(ops(), st, 2, 0, 1, "weightedkv")
    merged = got.values[:, 0, 1]
    assert torch.isfinite(merged).all()
    lo = torch.minimum(st.values[:, 0, 0], st.values[:, 0, 1])
    hi = torch.maximum(st.values[:, 0, 0], st.values[:, 0, 1])
    assert ((merged >= lo) & (merged <= hi)).all()
    assert_states_equal(got, run_compress(ref, st, 2, 0, 1, "weightedkv"))


# Weights at the edges of the scaling rule (docs/design.md, compress step 3): a negligible weight
# next to a huge one (double scaling of a subnormal), sums just around 2^-126, 1/2, 1 and 2^64,
# zero and negative-zero weights, negative weights (used unscaled), a sum overflowing to inf.
EDGE_WEIGHTS = [(1e-40, 1e30), (1.7 * 2.0 ** -100, 3e20), (2.0 ** -149, 3e38), (0.0, 2.0 ** 64),
                (1.0, 2.0 ** 64 - 2.0 ** 40), (2.0 ** -127, 2.0 ** -127), (2.0 ** -127, 2.0 ** -126),
                (0.25, 0.25), (0.2499999, 0.25), (0.5, 0.5), (-0.0, 1e-45), (-0.0, 0.0),
                (-1.0, 3.0), (-3.0, 1.0), (-1e-45, 1e-45), (2e38, 3e38), (1e-30, 1.5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_weights_at_the_edges_of_the_scaling_rule_match_the_reference(dtype):
    g = torch.Generator().manual_seed(13)
    values = torch.randn(len(EDGE_WEIGHTS), 3, 16, generator=g) * 1e3
    values[:4, 0] = TOP[dtype]  # a negligible weight times a huge value
    values[:4, 1] = 0.0
    st = merge_case(dtype, EDGE_WEIGHTS, values)
    got = run_compress(ops(), st, 2, 0, 1, "weightedkv")
    assert (got.slot_pos[:, 0, 0] == -1).all() and (got.slot_pos[:, 0, 1] == 1).all()
    assert_states_equal(got, run_compress(ref, st, 2, 0, 1, "weightedkv"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cam_addition_beyond_the_range_rounds_to_inf(dtype):
    """CaM adds v_j / m to its window: that can exceed the dtype's range, and the float32 result is
    then rounded like tensor.to(dtype) (IEEE: +-inf), identically in the reference. Only the
    window of that (b, h) is affected."""
    top = FP16_MAX if dtype == torch.float16 else torch.finfo(torch.bfloat16).max
    st = ref.new_state(2, 1, 4, 4, dtype)
    for b in range(2):
        st.slot_pos[b, 0, :3] = torch.tensor([0, 1, 2])
        st.scores[b, 0, :3] = 1.0  # avg_j == mean of the window: p = 1, always merged
        st.counts[b, 0, :3] = 1.0
    st.values[0, 0, :3] = torch.tensor([top, -top, 1.0, 2.0]).to(dtype)
    st.values[1, 0, :3] = torch.tensor([1.0, 2.0, 3.0, 4.0]).to(dtype)
    got = run_compress(ops(), st, 2, 0, 0, "cam", cam_window=1)
    assert_states_equal(got, run_compress(ref, st, 2, 0, 0, "cam", cam_window=1))
    assert torch.equal(got.values[0, 0, 1].float(), torch.tensor([float("inf"), -float("inf"),
                                                                   2.0, 4.0]))
    assert torch.isfinite(got.values[1]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_attention_of_values_at_the_top_of_the_range(dtype):
    """out = sum_c p_c v_c in float32: a convex combination, finite for values at +-max
    (fp32: just below FLT_MAX, see TOP)."""
    top = TOP[dtype]
    st = random_state(2, 2, 9, 16, dtype, held=7, seed=5)
    st.values.copy_(torch.where(torch.rand(st.values.shape) < 0.5, top, -top).to(dtype))
    q = torch.randn(2, 4, 16).to(dtype)
    args = (st.keys, st.values, st.slot_pos, torch.tensor([100, 100]))
    a, b = state_copy(st), state_copy(st)
    out = ops().decode_attention(q, *args, a.scores, a.counts, a.last, 0.25)
    want = ref.decode_attention(q, *args, b.scores, b.counts, b.last, 0.25)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double() / top, want.double() / top, rtol=0, atol=1e-5)


# -- exactly one eligible slot ---------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("policy", ref.POLICIES)
def test_budget_leaving_one_eligible_slot(policy, dtype, chunk):
    """budget = sinks + recent + 1: after every compress one non-protected token remains; each
    chunk's removals (1 or 5) pick among the eligible ones. ops == reference, bit for bit."""
    sinks, recent = 2, 3
    budget = sinks + recent + 1
    g = torch.Generator().manual_seed(6)
    states = [ref.new_state(2, 2, budget + chunk, 8, dtype) for _ in range(2)]
    n = 0
    for _ in range(6):
        pos = torch.arange(n, n + chunk).repeat(2, 1)
        n += chunk
        new = [torch.randn(2, 2, chunk, 8, generator=g).to(dtype) for _ in range(2)]
        probs = torch.rand(2, 4, chunk, budget + chunk, generator=g)
        for module, st in zip((ref, ops()), states):
            module.append(*st, *new, pos)
            module.accumulate(probs, st.slot_pos, pos, st.scores, st.counts, st.last)
            module.compress(*st, budget, sinks, recent, policy, cam_window=2, seed=5)
        assert_states_equal(states[1], states[0])
        for b in range(2):
            for h in range(2):
                kept = held_positions(states[1], b, h)
                assert len(kept) == min(n, budget)
                if n > budget:
                    assert kept[:sinks] == [0, 1] and kept[-recent:] == list(range(n - 3, n))


# -- head_dim 4096 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_huge_head_dim(dtype):
    """D = 4096 through append, accumulate, decode_attention and compress (merging policies)."""
    B, H, G, C, D = 1, 2, 2, 7, 4096
    g = torch.Generator().manual_seed(7)
    st = random_state(B, H, C, D, dtype, held=4, seed=8, pos_range=4)
    new = [torch.randn(B, H, 2, D, generator=g).to(dtype) for _ in range(2)]
    pos = torch.tensor([[4, 5]])
    probs = torch.rand(B, H * G, 2, C, generator=g)
    query = (torch.randn(B, H * G, D, generator=g)).to(dtype)
    results = []
    for module in (ref, ops()):
        s = state_copy(st)
        module.append(*s, *new, pos)
        module.accumulate(probs, s.slot_pos, pos, s.scores, s.counts, s.last)
        out = module.decode_attention(query, s.keys, s.values, s.slot_pos, torch.tensor([5]),
                                      s.scores, s.counts, s.last, D ** -0.5)
        results.append((s, out))
    (want, out_want), (got, out_got) = results
    tol = TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_got, out_want, **tol)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.slot_pos, want.slot_pos)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-6)
    for policy in ("weightedkv", "cam"):
        # compress from one common state (decode's float noise must not pick different tokens)
        assert_states_equal(run_compress(ops(), got, 3, 1, 1, policy, cam_window=2),
                            run_compress(ref, got, 3, 1, 1, policy, cam_window=2))


# -- NaN / inf -------------------------------------------------------------------------------------

B, H, G, C, D, T = 3, 2, 2, 10, 8, 3
BAD_B, BAD_H = 1, 1  # the poisoned (batch row, KV head)


def pipeline(module, dtype, policy, poison=None, bad=float("nan")):
    """append -> accumulate -> decode_attention -> compress on a fixed random cache; `poison`
    names the input that gets `bad` in row (BAD_B, BAD_H) only. Returns (state, decode out)."""
    g = torch.Generator().manual_seed(9)
    st = random_state(B, H, C, D, dtype, held=6, seed=10, pos_range=6)
    nk, nv = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(2))
    pos = torch.arange(6, 6 + T).repeat(B, 1)
    probs = torch.rand(B, H * G, T, C, generator=g)
    query = torch.randn(B, H * G, D, generator=g).to(dtype)
    hq = slice(BAD_H * G, BAD_H * G + G)
    if poison == "new_keys":
        nk[BAD_B, BAD_H, 1, 3] = bad
    elif poison == "new_values":
        nv[BAD_B, BAD_H, 0, :] = bad
    elif poison == "probs":
        probs[BAD_B, BAD_H * G, 2, :] = bad
    elif poison == "query":
        query[BAD_B, hq.start, 5] = bad
    elif poison == "cache_keys":
        st.keys[BAD_B, BAD_H, st.slot_pos[BAD_B, BAD_H].argmax()] = bad
    elif poison == "scores":
        st.scores[BAD_B, BAD_H, st.slot_pos[BAD_B, BAD_H] >= 0] = bad
    elif poison == "last":
        st.last[BAD_B, BAD_H] = bad
    module.append(*st, nk, nv, pos)
    module.accumulate(probs, st.slot_pos, pos, st.scores, st.counts, st.last)
    out = module.decode_attention(query, st.keys, st.values, st.slot_pos, torch.tensor([9] * B),
                                  st.scores, st.counts, st.last, D ** -0.5)
    module.compress(*st, 5, 1, 1, policy, cam_window=3)
    return st, out


POISONS = ["new_keys", "new_values", "probs", "query", "cache_keys", "scores", "last"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("policy", ["weightedkv", "h2o", "tova", "cam"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_and_inf_stay_in_their_row(dtype, policy, poison, bad):
    """A non-finite input in one (b, h) changes nothing in any other (b, h): caches and decode
    outputs there are bit-identical to a clean run. No crash, no error."""
    clean, out_clean = pipeline(ops(), dtype, policy)
    dirty, out_dirty = pipeline(ops(), dtype, policy, poison, bad)
    other = torch.ones(B, H, dtype=torch.bool)
    other[BAD_B, BAD_H] = False
    for name, c, d in zip(ref.State._fields, clean, dirty):
        assert torch.equal(c[other], d[other]), name
    other_q = other.repeat_interleave(G, dim=1)
    assert torch.equal(out_clean[other_q], out_dirty[other_q])


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("policy", ["weightedkv", "evict", "tova", "cam"])
def test_nan_rows_match_the_reference(policy, poison):
    """Inside the poisoned row the result is the contract's, as the reference computes it: NaN
    statistics sort lowest (removed first), NaN/inf merge weights fall back to 1/2, NaN logits
    make that head's softmax NaN."""
    want, out_want = pipeline(ref, torch.float32, policy, poison)
    got, out_got = pipeline(ops(), torch.float32, policy, poison)
    torch.testing.assert_close(out_got, out_want, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.equal(got.slot_pos, want.slot_pos) and torch.equal(got.counts, want.counts)
    for name in ("keys", "values", "scores", "last"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6,
                                   equal_nan=True, msg=name)


@pytest.mark.parametrize("policy", KEYED)
def test_a_nan_statistic_is_removed_first(policy):
    """The eligible token whose key is NaN is the first removed (NaN counts as the lowest key)."""
    st = random_state(1, 2, 12, 4, torch.float32, held=10, seed=11, pos_range=10)
    uniform_stats(st, 0.5)
    target = st.slot_pos[0, :] == 6  # position 6 in both heads (eligible: sinks 1, recent 2)
    name = "last" if policy == "tova" else "scores"
    getattr(st, name)[0][target] = float("nan")
    got = run_compress(ops(), st, 9, 1, 2, policy)
    for h in range(2):
        assert held_positions(got, 0, h) == [0, 1, 2, 3, 4, 5, 7, 8, 9]


def test_nan_value_spreads_only_to_the_right_neighbour():
    """A NaN value merged by WeightedKV makes the right neighbour's value NaN (the contract's
    formula), nothing else: other tokens of that row and other rows keep their values."""
    st = random_state(1, 2, 8, 4, torch.float32, held=6, seed=12, pos_range=6)
    uniform_stats(st, 0.5)
    st.scores[0, 0, st.slot_pos[0, 0] == 2] = 0.0  # position 2 has the lowest average
    st.values[0, 0, st.slot_pos[0, 0] == 2] = float("nan")
    got = run_compress(ops(), st, 5, 1, 1, "weightedkv")
    row = got.values[0, 0]
    nan_slots = set(torch.nonzero(torch.isnan(row).any(-1)).flatten().tolist())
    held_nan = {c for c in nan_slots if got.slot_pos[0, 0, c] >= 0}
    assert [int(got.slot_pos[0, 0, c]) for c in held_nan] == [3]
    assert torch.isfinite(got.values[0, 1]).all()
