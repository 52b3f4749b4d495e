"""decode_attention's features (window, softcap, sinks, caller-allocated out) and the fused
block_attention op: compiled kernels == the pure-PyTorch reference (docs/design.md).

Outputs match within per-dtype tolerances, the statistics within float32 rounding, counts and the
slot order exactly; block_attention's statistics also equal `accumulate` applied to the
reference's probabilities. Argument errors name the op, the argument and the bad value.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import DTYPE_IDS, DTYPES, TOL, compiled_ops, layout, random_state, ref, state_copy

OUT_TOL = {**TOL, torch.float32: dict(rtol=1e-5, atol=1e-6)}
STAT_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def features(window=0, softcap=0.0, sinks=None):
    return dict(window=window, softcap=softcap, sinks=sinks)


FEATURES = {  # name: (window, softcap, sink scale or None)
    "plain": (0, 0.0, None),
    "window": (5, 0.0, None),
    "softcap": (0, 1.5, None),
    "sinks": (0, 0.0, 2.0),
    "window+softcap": (3, 4.0, None),
    "all": (4, 0.8, 1.0),
}


def sinks_for(Hq, scale, seed=0):
    if scale is None:
        return None
    return torch.randn(Hq, generator=torch.Generator().manual_seed(seed)) * scale


def check_same(got_args, got_out, want_args, want_out, dtype, stats=(5, 6, 7)):
    assert got_out.dtype == want_out.dtype and got_out.shape == want_out.shape
    torch.testing.assert_close(got_out, want_out, **OUT_TOL[dtype])
    assert torch.equal(got_args[6], want_args[6])  # counts
    torch.testing.assert_close(got_args[5], want_args[5], **STAT_TOL)  # scores
    torch.testing.assert_close(got_args[7], want_args[7], **STAT_TOL)  # last
    assert torch.equal(got_args[3], want_args[3])  # slot_pos untouched


def run_both(name, args, kwargs, strided=False):
    """Call `name` of the reference and of the compiled ops on layout copies of args."""
    out = []
    for module in (ref, compiled_ops()):
        a = [layout(x, strided) if isinstance(x, torch.Tensor) else x for x in args]
        kw = {k: (layout(v, strided) if isinstance(v, torch.Tensor) else v)
              for k, v in kwargs.items()}
        out.append((a, getattr(module, name)(*a, **kw)))
    return out


# ---------------------------------------------------------------------------------------------
# decode_attention with the features


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_attention_features(dtype, feature, G, strided):
    B, H, C, D = 4, 2, 19, 40
    window, softcap, sink_scale = FEATURES[feature]
    st = random_state(B, H, C, D, dtype, held=lambda b, h: 9 + 4 * h, seed=21, pos_range=40)
    g = torch.Generator().manual_seed(22)
    query = torch.randn(B, H * G, D, generator=g).to(dtype)
    # sees all / causal cut / padding row / a query before every held position (sees nothing)
    qpos = torch.tensor([60, 20, -1, 0])
    st.slot_pos[3] = torch.where(st.slot_pos[3] >= 0, st.slot_pos[3] + 1, -1)
    args = [query, *st[:2], st.slot_pos, qpos, *st[2:5], 0.7]
    kw = features(window, softcap, sinks_for(H * G, sink_scale))
    (want, out_want), (got, out_got) = run_both("decode_attention", args, kw, strided)
    check_same(got, out_got, want, out_want, dtype)
    assert not out_got[2:].any()  # padding row and the row that sees nothing


def test_decode_attention_window_keeps_only_recent_slots():
    """window smaller than the held tokens: equal to attention over the window's slots alone."""
    ops = compiled_ops()
    B, H, C, D = 1, 1, 12, 8
    st = random_state(B, H, C, D, torch.float32, held=12, seed=3, pos_range=12)  # positions 0..11
    q = torch.randn(B, H, D)
    out = ops.decode_attention(q, *st[:2], st.slot_pos, torch.tensor([11]), *st[2:5], 0.5,
                               window=4)
    keep = (st.slot_pos[0, 0] >= 8)
    logits = (st.keys[0, 0][keep] @ q[0, 0]) * 0.5
    want = torch.softmax(logits, 0) @ st.values[0, 0][keep]
    torch.testing.assert_close(out[0, 0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["decode_attention", "block_attention"])
def test_sink_probabilities_sum_below_one(op):
    """With a sink the probabilities sum to 1 - e^(s-m)/Z < 1: scores (group_reduce="sum", one
    query) grow by exactly that mass; without a sink by 1."""
    ops = compiled_ops()
    B, H, G, C, D = 1, 2, 2, 10, 16
    for sink, expect in ((None, None), (torch.tensor([0.5, -1.0, 3.0, 0.0]), "below")):
        for module in (ref, ops):
            st = random_state(B, H, C, D, torch.float32, held=8, seed=4, pos_range=10)
            before = st.scores.clone()
            q = torch.randn(B, H * G, D, generator=torch.Generator().manual_seed(5))
            qpos = torch.tensor([9])
            if op == "block_attention":
                q, qpos = q[:, :, None], qpos[:, None]
            getattr(module, op)(q, *st[:2], st.slot_pos, qpos, *st[2:5], 0.4, "sum", sinks=sink)
            mass = (st.scores - before).sum(-1) / G  # [B, H]: mean over the group's heads
            if expect is None:
                torch.testing.assert_close(mass, torch.ones_like(mass))
            else:
                logits = torch.einsum("hgd,hcd->hgc", q.reshape(H, G, D),
                                      st.keys[0].float()) * 0.4
                held = (st.slot_pos[0] >= 0)[:, None, :]
                logits = logits.masked_fill(~held, float("-inf"))
                full = torch.cat([logits, sink.view(H, G, 1)], -1).softmax(-1)
                want = full[..., :-1].sum(-1).mean(-1)
                assert (mass < 1).all()
                torch.testing.assert_close(mass[0], want, rtol=1e-5, atol=1e-6)


def test_softcap_bounds_logits():
    """softcap c: huge logits are capped at c, so a very aligned key no longer takes all mass."""
    ops = compiled_ops()
    st = random_state(1, 1, 4, 4, torch.float32, held=4, seed=0, pos_range=4)
    st.keys.zero_()
    st.keys[0, 0, 0] = torch.tensor([100.0, 0, 0, 0])
    q = torch.tensor([[[1.0, 0, 0, 0]]])
    args = (q, *st[:2], st.slot_pos, torch.tensor([9]), *st[2:5], 1.0)
    plain = ops.decode_attention(*args)
    capped = ops.decode_attention(*args, softcap=2.0)
    p0 = torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 3)
    want = p0 * st.values[0, 0, 0] + (1 - p0) / 3 * st.values[0, 0, 1:].sum(0)
    torch.testing.assert_close(capped[0, 0], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain[0, 0], st.values[0, 0, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["decode_attention", "block_attention"])
def test_out_is_written_and_returned(op):
    ops = compiled_ops()
    st = random_state(2, 2, 9, 8, torch.bfloat16, held=6, seed=9)
    q = torch.randn(2, 4, 8).bfloat16()
    qpos = torch.tensor([40, 12])
    if op == "block_attention":
        q, qpos = q[:, :, None].expand(2, 4, 3, 8), torch.tensor([[5, 20, 40], [-1, 3, 12]])
    want = getattr(ops, op)(q, *state_copy(st)[:2], st.slot_pos, qpos,
                            *state_copy(st)[2:5], 0.3, window=7)
    buf = torch.full((*q.shape[:-1], 2 * q.shape[-1]), 9.0, dtype=q.dtype)
    out = buf[..., ::2]  # a strided caller buffer
    got = getattr(ops, op)(q, *st[:2], st.slot_pos, qpos, *st[2:5], 0.3, window=7, out=out)
    assert got is out
    assert torch.equal(out, want)
    assert (buf[..., 1::2] == 9).all()  # nothing written outside out


def decode_call(**kw):
    st = random_state(1, 2, 6, 4, torch.float32, held=4, seed=0)
    return [torch.randn(1, 4, 4), *st[:2], st.slot_pos, torch.tensor([9]), *st[2:5], 0.5], kw


def block_call(**kw):
    st = random_state(1, 2, 6, 4, torch.float32, held=4, seed=0)
    return [torch.randn(1, 4, 3, 4), *st[:2], st.slot_pos, torch.tensor([[7, 8, 9]]),
            *st[2:5], 0.5], kw


ERRORS = {
    "negative window": (dict(window=-1), r"{op}: window must be >= 0 .*got window=-1"),
    "bool window": (dict(window=True), r"{op}: window must be an int, got window=True"),
    "negative softcap": (dict(softcap=-0.5), r"{op}: softcap must be .*>= 0 .*softcap=-0.5"),
    "nan softcap": (dict(softcap=float("nan")), r"{op}: softcap must be .*got softcap=nan"),
    "inf softcap": (dict(softcap=float("inf")), r"{op}: softcap must be .*got softcap=inf"),
    "sinks wrong shape": (dict(sinks=torch.zeros(3)),
                          r"{op}: sinks must have shape \[Hq\].* = \[4\], got \[3\]"),
    "sinks 2-D": (dict(sinks=torch.zeros(1, 4)), r"{op}: sinks must be a 1-D tensor"),
    "sinks float16": (dict(sinks=torch.zeros(4, dtype=torch.float16)),
                      r"{op}: sinks must have dtype (Float|torch.float32), got (Half|torch.float16)"),
    "sinks on meta": (dict(sinks=torch.zeros(4, device="meta")),
                      r"{op}: all tensors must be on one device, but keys is on cpu and sinks "
                      r"is on meta"),
    "out wrong dtype": ("out-dtype", r"{op}: out must have the dtype of query"),
    "out wrong shape": ("out-shape", r"{op}: out must have shape"),
    "out is keys": ("out-alias", r"{op}: keys shares memory with out, which is written in place"),
}


@pytest.mark.parametrize("case", list(ERRORS))
@pytest.mark.parametrize("op", ["decode_attention", "block_attention"])
def test_feature_argument_errors(op, case):
    ops = compiled_ops()
    kw, pattern = ERRORS[case]
    args, _ = (decode_call if op == "decode_attention" else block_call)()
    if kw == "out-dtype":
        kw = dict(out=torch.empty(args[0].shape, dtype=torch.float64))
    elif kw == "out-shape":
        kw = dict(out=torch.empty(*args[0].shape[:-1], 5))
    elif kw == "out-alias":
        kw = dict(out=args[1].view(-1)[:args[0].numel()].view(args[0].shape))
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises((RuntimeError, ValueError), match=pattern.format(op=op)):
        getattr(ops, op)(*args, **kw)
    for a, b in zip([a for a in args if isinstance(a, torch.Tensor)], before):
        assert torch.equal(a, b)
    if case in ("negative window", "negative softcap", "nan softcap", "sinks wrong shape",
                "sinks float16"):
        with pytest.raises(ValueError, match=pattern.format(op=op)):
            getattr(ref, op)(*args, **kw)


# ---------------------------------------------------------------------------------------------
# block_attention


def block_case(B, H, G, C, D, Q, dtype, seed, held=None, strided_q=False):
    st = random_state(B, H, C, D, dtype, held=held or (lambda b, h: C - Q - 2 * h),
                      seed=seed, pos_range=C - Q)
    g = torch.Generator().manual_seed(seed + 1)
    # the chunk itself is appended at positions base .. base + Q - 1 (as the integration does)
    base = C - Q
    for b in range(B):
        for h in range(H):
            free = (st.slot_pos[b, h] < 0).nonzero().flatten()[:Q]
            st.slot_pos[b, h, free] = torch.arange(base, base + len(free))
    qpos = torch.arange(base, base + Q).repeat(B, 1)
    if B > 1:
        qpos[1, : Q // 2] = -1  # left padding
    if B > 2:
        qpos[2] = torch.arange(Q) - Q  # negative except... all padding
    query = torch.randn(B, H * G, Q, D, generator=g).to(dtype)
    if strided_q:
        query = query.transpose(1, 2).contiguous().transpose(1, 2)
    return st, query, qpos


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("G,D,Q", [(1, 64, 1), (2, 59, 7), (4, 128, 16), (8, 64, 5),
                                   (3, 59, 33)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_block_attention_matches_reference(dtype, G, D, Q, strided):
    B, H, C = 3, 2, Q + 13
    st, query, qpos = block_case(B, H, G, C, D, Q, dtype, seed=G * D + Q)
    args = [query, *st[:2], st.slot_pos, qpos, *st[2:5], D ** -0.5]
    (want, out_want), (got, out_got) = run_both("block_attention", args, {}, strided)
    check_same(got, out_got, want, out_want, dtype)
    assert not out_got[2].any() and not out_got[1, :, : Q // 2].any()  # padding queries


@pytest.mark.parametrize("Q", [1, 2, 31, 64, 129])
def test_block_attention_chunk_sizes(Q):
    B, H, G, D = 2, 1, 2, 16
    C = Q + 9
    st, query, qpos = block_case(B, H, G, C, D, Q, torch.float16, seed=Q)
    args = [query, *st[:2], st.slot_pos, qpos, *st[2:5], 0.25]
    (want, out_want), (got, out_got) = run_both("block_attention", args, {"group_reduce": "max"})
    check_same(got, out_got, want, out_want, torch.float16)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_block_attention_features(dtype, feature):
    B, H, G, C, D, Q = 2, 2, 3, 30, 24, 9
    window, softcap, sink_scale = FEATURES[feature]
    st, query, qpos = block_case(B, H, G, C, D, Q, dtype, seed=31)
    qpos[0, 0] = 0  # a query before every held position of some heads: sees nothing there
    args = [query, *st[:2], st.slot_pos, qpos, *st[2:5], 0.4]
    kw = features(window, softcap, sinks_for(H * G, sink_scale, seed=2))
    (want, out_want), (got, out_got) = run_both("block_attention", args, kw, strided=True)
    check_same(got, out_got, want, out_want, dtype)


@pytest.mark.parametrize("reduce", ["mean", "sum", "max"])
def test_block_attention_statistics_equal_accumulate_of_reference_probabilities(reduce):
    """The statistics are accumulate's on the attention probabilities (computed here with torch,
    independently of the reference's attention code), window and sinks included."""
    ops = compiled_ops()
    B, H, G, C, D, Q = 2, 2, 2, 24, 16, 6
    st, query, qpos = block_case(B, H, G, C, D, Q, torch.float32, seed=5)
    sinks = torch.randn(H * G)
    window = 9
    want = state_copy(st)
    # probabilities [B, Hq, Q, C] with torch: masked (causal + window) softmax with a sink column
    k = st.keys.repeat_interleave(G, 1)
    logits = torch.einsum("bhqd,bhcd->bhqc", query, k) * 0.3
    sp = st.slot_pos.repeat_interleave(G, 1)[:, :, None, :]
    qp = qpos[:, None, :, None]
    vis = (sp >= 0) & (sp <= qp) & (qp - sp < window) & (qp >= 0)
    logits = logits.masked_fill(~vis, float("-inf"))
    full = torch.cat([logits, sinks.view(1, -1, 1, 1).expand(B, -1, Q, 1)], -1).softmax(-1)
    probs = full[..., :-1].nan_to_num(0.0)
    ops.accumulate(probs, want.slot_pos, qpos, want.scores, want.counts, want.last, reduce)
    got = state_copy(st)
    ops.block_attention(query, *got[:2], got.slot_pos, qpos, *got[2:5], 0.3, reduce,
                        window=window, sinks=sinks)
    assert torch.equal(got.counts, want.counts)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.last, want.last, rtol=1e-5, atol=1e-6)


def test_block_attention_equals_decode_attention_per_query():
    """Q = 1 block == decode_attention bit for bit (the same kernel rows)."""
    ops = compiled_ops()
    st, query, qpos = block_case(2, 2, 4, 20, 32, 1, torch.bfloat16, seed=8)
    a, b = state_copy(st), state_copy(st)
    o1 = ops.block_attention(query, *a[:2], a.slot_pos, qpos, *a[2:5], 0.2, softcap=3.0)
    o2 = ops.decode_attention(query[:, :, 0], *b[:2], b.slot_pos, qpos[:, 0], *b[2:5], 0.2,
                              softcap=3.0)
    assert torch.equal(o1[:, :, 0], o2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# compress: head_offset (tensor parallelism) and integer arguments


@pytest.mark.parametrize("h0,h1", [(0, 2), (1, 3), (2, 4), (3, 4)])
def test_cam_head_offset_shard_equals_full_run(h0, h1):
    """Heads [h0:h1] compressed alone with head_offset=h0 == the same heads of the full run."""
    ops = compiled_ops()
    st = random_state(2, 4, 24, 8, torch.float16, held=20, seed=17)
    full = state_copy(st)
    ops.compress(*full, 10, 1, 2, "cam", cam_window=3, seed=11)
    shard = state_copy(type(st)(*(t[:, h0:h1] for t in st)))
    ops.compress(*shard, 10, 1, 2, "cam", cam_window=3, seed=11, head_offset=h0)
    for s, f in zip(shard, full):
        assert torch.equal(s, f[:, h0:h1])
    rshard = state_copy(type(st)(*(t[:, h0:h1] for t in st)))
    ref.compress(*rshard, 10, 1, 2, "cam", cam_window=3, seed=11, head_offset=h0)
    for s, r in zip(shard, rshard):
        assert torch.equal(s, r)
    if h0 > 0:  # without the offset the shard draws other numbers
        wrong = state_copy(type(st)(*(t[:, h0:h1] for t in st)))
        ops.compress(*wrong, 10, 1, 2, "cam", cam_window=3, seed=11)
        assert not torch.equal(wrong.values, shard.values)


def test_compress_head_offset_errors():
    ops = compiled_ops()
    st = random_state(1, 2, 8, 4, torch.float32, held=6, seed=0)
    with pytest.raises(RuntimeError, match=r"compress: head_offset must be >= 0 .*got "
                                           r"head_offset=-1"):
        ops.compress(*st, 4, 1, 1, "cam", head_offset=-1)
    with pytest.raises(RuntimeError, match=r"compress: head_offset \+ H must fit in int64"):
        ops.compress(*st, 4, 1, 1, "cam", head_offset=2 ** 63 - 2)


@pytest.mark.parametrize("name,value", [("budget", True), ("sinks", False), ("recent", True),
                                        ("cam_window", True), ("seed", False),
                                        ("head_offset", True)])
def test_compress_refuses_bools(name, value):
    ops = compiled_ops()
    st = random_state(1, 1, 8, 4, torch.float32, held=6, seed=0)
    kw = dict(budget=4, sinks=1, recent=1, policy="h2o", cam_window=2, seed=0, head_offset=0)
    kw[name] = value
    before = state_copy(st)
    with pytest.raises(ValueError, match=rf"compress: {name} must be an int, got {name}="
                                         rf"{value} \(a bool\)"):
        ops.compress(*st, **kw)
    for a, b in zip(st, before):
        assert torch.equal(a, b)


def test_integer_like_arguments_are_accepted():
    ops = compiled_ops()
    st = random_state(1, 2, 12, 4, torch.float32, held=10, seed=1)
    a, b = state_copy(st), state_copy(st)
    ops.compress(*a, np.int64(5), np.int32(1), np.int16(2), "cam", cam_window=np.uint8(3),
                 seed=np.int64(4), head_offset=np.int64(1))
    ops.compress(*b, 5, 1, 2, "cam", cam_window=3, seed=4, head_offset=1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    q = torch.randn(1, 2, 4)
    o1 = ops.decode_attention(q, *a[:2], a.slot_pos, torch.tensor([30]), *a[2:5],
                              np.float32(0.5), window=np.int64(3), softcap=np.float64(2.0))
    o2 = ops.decode_attention(q, *b[:2], b.slot_pos, torch.tensor([30]), *b[2:5], 0.5,
                              window=3, softcap=2.0)
    assert torch.equal(o1, o2)
