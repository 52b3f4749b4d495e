"""Properties of compress that hold for both implementations: k removals in one call == k calls
of one removal (bit for bit), the budget, sinks and recent window are respected over a stream,
and WeightedKV merges are convex combinations."""
import pytest
import torch

from helpers import (DTYPE_IDS, DTYPES, assert_states_equal, held_count, impl, random_state, ref,
                     state_copy, stream)

IMPLS = ["reference", "ops"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("policy", ref.POLICIES)
@pytest.mark.parametrize("which", IMPLS)
def test_k_removals_equal_k_single_removals(which, policy, dtype):
    op = impl(which)
    budget, k = 6, 9
    st = random_state(2, 2, 20, 16, dtype, held=budget + k, seed=11)
    once, stepwise = state_copy(st), state_copy(st, strided=True)
    op.compress(*once, budget, 1, 2, policy, cam_window=4, seed=3)
    for b in range(budget + k - 1, budget - 1, -1):
        op.compress(*stepwise, b, 1, 2, policy, cam_window=4, seed=3)
    assert_states_equal(stepwise, once)


@pytest.mark.parametrize("policy", ref.POLICIES)
@pytest.mark.parametrize("which", IMPLS)
def test_stream_respects_budget_sinks_and_recent(which, policy):
    budget, sinks, recent = 8, 2, 2

    def check(before, after, n):
        assert int(held_count(after.slot_pos).max()) <= budget
        for b in range(after.keys.shape[0]):
            for h in range(after.keys.shape[1]):
                kept = set(ref.held_in_order(after, b, h).positions.tolist())
                must = set(range(min(sinks, n[b]))) | set(range(max(0, n[b] - recent), n[b]))
                assert must <= kept, (b, h, sorted(kept))
                assert len(kept) == min(n[b], budget)

    stream(impl(which), policy, steps=14, budget=budget, sinks=sinks, recent=recent, check=check)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("which", IMPLS)
def test_weightedkv_merge_is_convex(which, dtype):
    """One token per step, so every compress removes one token j per (b, h): its right neighbour's
    new value lies in the per-coordinate [min, max] of v_j and the old v_r; all else unchanged."""
    merges = []

    def check(before, after, n):
        for b in range(after.keys.shape[0]):
            for h in range(after.keys.shape[1]):
                order = ref.held_slots(before.slot_pos, b, h)
                gone = [c for c in order if after.slot_pos[b, h, c] < 0]
                if not gone:
                    continue
                (j,) = gone
                r = order[order.index(j) + 1]  # recent > 0: a right neighbour exists
                vj, vr = before.values[b, h, j].float(), before.values[b, h, r].float()
                new = after.values[b, h, r].float()
                slack = 1e-6 * torch.maximum(vj.abs(), vr.abs()) if dtype == torch.float32 else 0
                assert (new >= torch.minimum(vj, vr) - slack).all()
                assert (new <= torch.maximum(vj, vr) + slack).all()
                others = [c for c in order if c not in (j, r)]
                assert torch.equal(after.values[b, h, others], before.values[b, h, others])
                merges.append((b, h))

    stream(impl(which), "weightedkv", steps=16, chunk=1, padding=False, dtype=dtype, check=check)
    assert len(merges) == 4 * (16 - 8)
