"""The toy trace of Fig. 3 of the WeightedKV paper: budget 4, no sinks, no recent window.

Tokens v1..v8 arrive one per step; from step 5 on, the test sets the average score of every held
token (a = avg, n = 1) and compresses, so each step merges the lowest-average token into its right
neighbour. Values are one-hot (v_i = e_i), so a held value reads as the coefficients of the
convex combination; the expected coefficients below are worked out by hand.
"""
import pytest
import torch

from helpers import DTYPE_IDS, DTYPES, TOL, impl, ref

D = 8  # one-hot values v1..v8
BUDGET = 4

# avg of the held tokens (by token number 1..8) before compressing at steps 5..8, the token that
# must go, and the right neighbour it merges into.
STEPS = {
    5: ({1: 0.3, 2: 0.1, 3: 0.5, 4: 0.4, 5: 0.6}, 2, 3),
    6: ({1: 0.5, 3: 0.6, 4: 0.2, 5: 0.3, 6: 0.7}, 4, 5),
    7: ({1: 0.2, 3: 0.4, 5: 0.5, 6: 0.3, 7: 0.6}, 1, 3),  # v2 is gone: v1's neighbour is v3
    8: ({3: 0.6, 5: 0.1, 6: 0.3, 7: 0.5, 8: 0.4}, 5, 6),  # v5 (holding v4) merges into v6
}


def expected_coefficients():
    """Held tokens after step 8 and their values as coefficients over v1..v8, by hand."""
    # step 5: v3 <- (0.1 v2 + 0.5 v3) / 0.6 = v2/6 + 5 v3/6
    # step 6: v5 <- (0.2 v4 + 0.3 v5) / 0.5 = 0.4 v4 + 0.6 v5
    # step 7: v3 <- (0.2 v1 + 0.4 v3) / 0.6 = v1/3 + 2/3 (v2/6 + 5 v3/6) = v1/3 + v2/9 + 5 v3/9
    # step 8: v6 <- (0.1 v5 + 0.3 v6) / 0.4 = 1/4 (0.4 v4 + 0.6 v5) + 3/4 v6
    #                                        = 0.1 v4 + 0.15 v5 + 0.75 v6
    rows = {
        3: {1: 1 / 3, 2: 1 / 9, 3: 5 / 9},
        6: {4: 0.1, 5: 0.15, 6: 0.75},
        7: {7: 1.0},
        8: {8: 1.0},
    }
    out = torch.zeros(len(rows), D, dtype=torch.float64)
    for row, (_, coeffs) in enumerate(sorted(rows.items())):
        for token, c in coeffs.items():
            out[row, token - 1] = c
    return sorted(rows), out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("which", ["reference", "ops"])
def test_fig3_trace(which, dtype):
    op = impl(which)
    st = ref.new_state(1, 1, BUDGET + 1, D, dtype)
    for step in range(1, 9):
        pos = step - 1  # token v_step has position step - 1
        k = torch.full((1, 1, 1, D), float(step), dtype=dtype)
        v = torch.nn.functional.one_hot(torch.tensor(pos), D).to(dtype).view(1, 1, 1, D)
        op.append(*st, k, v, torch.tensor([[pos]]))
        if step < 5:
            continue
        avgs, gone, into = STEPS[step]
        held = ref.held_in_order(st, 0, 0).positions
        assert held.tolist() == [t - 1 for t in sorted(avgs)]
        for c in range(BUDGET + 1):
            st.scores[0, 0, c] = avgs[int(st.slot_pos[0, 0, c]) + 1]
        st.counts.fill_(1.0)
        before = ref.held_in_order(st, 0, 0)
        op.compress(*st, BUDGET, 0, 0, "weightedkv")
        after = ref.held_in_order(st, 0, 0)
        assert after.positions.tolist() == [t - 1 for t in sorted(avgs) if t != gone]
        # the merge target keeps its key and statistics
        i = before.positions.tolist().index(into - 1)
        o = after.positions.tolist().index(into - 1)
        assert torch.equal(after.keys[o], before.keys[i])
        assert after.scores[o] == before.scores[i] and after.counts[o] == before.counts[i]

    tokens, want = expected_coefficients()
    final = ref.held_in_order(st, 0, 0)
    assert final.positions.tolist() == [t - 1 for t in tokens]
    assert final.keys[:, 0].tolist() == [float(t) for t in tokens]
    torch.testing.assert_close(final.values.double(), want, **TOL[dtype], check_dtype=False)
