"""CUDA kernels == CPU kernels == the pure-PyTorch reference, op by op.

append, accumulate and compress are bit-identical on CPU and CUDA (same float32 formulas, no FMA
contraction, fixed orders; compress's arg-min is a strict total order), so their states are
compared exactly, in every dtype, contiguous and strided. decode_attention and block_attention
(dot products, exp, different summation order) are compared within per-dtype tolerances, with
exact counts. The paths of large shapes, streams and devices: test_cuda_shapes.py.
Skipped without a CUDA device or when the extension was built without the CUDA kernels.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import (DTYPE_IDS, DTYPES, ROOT, TOL, assert_states_equal, layout,
                     random_state, ref, state_copy, stream)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device (torch.cuda.is_available() is False)")

POLICIES = ref.POLICIES
OUT_TOL = {**TOL, torch.float32: dict(rtol=1e-5, atol=1e-6)}
STAT_TOL = dict(rtol=1e-5, atol=1e-7)


def to(device, args, strided=False):
    return [layout(a.to(device), strided) if isinstance(a, torch.Tensor) else a for a in args]


def cpu(args):
    return [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]


def run3(ops, name, args, kwargs=None, strided=False):
    """(reference, CPU kernel, CUDA kernel): the mutated arguments (on the CPU) and the result."""
    kwargs = kwargs or {}
    results = []
    for module, device in ((ref, "cpu"), (ops, "cpu"), (ops, "cuda")):
        a = to(device, args, strided)
        out = getattr(module, name)(*a, **kwargs)
        results.append((cpu(a), out.cpu() if isinstance(out, torch.Tensor) else out))
    return results


# ---------------------------------------------------------------------------------------------
# append


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("B,H,C,T,D", [(3, 2, 12, 5, 59), (2, 3, 300, 200, 16)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_append(cuda_ops, dtype, B, H, C, T, D, strided):
    st = random_state(B, H, C, D, dtype, held=lambda b, h: (C - T) * ((b + h) % 3) // 3, seed=1)
    g = torch.Generator().manual_seed(2)
    new_pos = torch.arange(T).repeat(B, 1) + 1000
    new_pos[torch.rand(B, T, generator=g) < 0.3] = -1  # padding anywhere
    new_pos[-1] = -1  # a row without tokens
    args = [*st, torch.randn(B, H, T, D, generator=g).to(dtype),
            torch.randn(B, H, T, D, generator=g).to(dtype), new_pos]
    (want, _), (cpu_got, _), (got, _) = run3(cuda_ops, "append", args, strided=strided)
    held = want[5] >= 0  # keys/values of free slots are garbage on every side: compare held ones
    assert_states_equal(cpu_got[2:6], want[2:6])
    assert_states_equal(got[2:6], want[2:6])
    for i in (0, 1):
        assert torch.equal(got[i][held], want[i][held])


def test_append_not_enough_slots_sync_check(cuda_ops, monkeypatch):
    """WKV_CUDA_SYNC_CHECKS=1: the CPU kernel's error, and the cache is left untouched."""
    monkeypatch.setenv("WKV_CUDA_SYNC_CHECKS", "1")
    st = to("cuda", random_state(2, 2, 6, 4, torch.float32, held=4, seed=0))
    before = state_copy(st)
    new = [torch.zeros(2, 2, 3, 4, device="cuda"), torch.zeros(2, 2, 3, 4, device="cuda"),
           torch.arange(3, device="cuda").repeat(2, 1)]
    with pytest.raises(RuntimeError, match=r"append: not enough free slots in batch row 0, head 0: "
                                           r"3 new tokens but only 2 free slots"):
        cuda_ops.append(*st, *new)
    assert_states_equal(st, before)


def test_append_not_enough_slots_device_assert(cuda_ops):
    """Default (no host sync): a device-side assert; checked in a subprocess (it poisons the
    CUDA context). Skipped, like every test here, on a build without the CUDA kernels."""
    code = textwrap.dedent("""
        import torch, weightedkv_ext
        from weightedkv_ext import ops, reference as ref
        st = ref.new_state(1, 1, 2, 4, device="cuda")
        new = [torch.zeros(1, 1, 3, 4, device="cuda"), torch.zeros(1, 1, 3, 4, device="cuda"),
               torch.arange(3, device="cuda")[None]]
        cuda_ops.append(*st, *new)
        torch.cuda.synchronize()
        print("NO ERROR")
    """)
    env = {k: v for k, v in os.environ.items() if k != "WKV_CUDA_SYNC_CHECKS"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "NO ERROR" not in r.stdout, r.stdout + r.stderr
    assert "assert" in (r.stdout + r.stderr).lower(), r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# accumulate


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("reduce", ["mean", "sum", "max"])
@pytest.mark.parametrize("B,G,C,Q", [(1, 1, 13, 1), (3, 4, 97, 6)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_accumulate(cuda_ops, dtype, B, G, C, Q, reduce, strided):
    H = 2
    st = random_state(B, H, C, 4, torch.float32, held=lambda b, h: C // 2 + 4 * h, seed=3)
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(B, H * G, Q, C, generator=g)
    probs[probs < 0.2] = 0.0
    probs[..., :3] = 0.25
    probs[0, 0, 0, 5] = float("nan")  # NaN handling of the max reduction
    qpos = torch.randint(0, 3 * C, (B, Q), generator=g)
    qpos[0, -1] = -1  # padding query
    if B > 2:
        qpos[2] = -1  # a row without valid queries: nothing changes
    args = [probs.to(dtype), st.slot_pos, qpos, st.scores, st.counts, st.last]
    (want, _), (cpu_got, _), (got, _) = run3(cuda_ops, "accumulate", args, dict(group_reduce=reduce),
                                             strided)
    for i in (3, 4, 5):
        torch.testing.assert_close(cpu_got[i], want[i], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got[i], want[i], rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# compress

# name: B, H, C, D, budget, sinks, recent, k removed, cam_window, seed, strided, positions
SCENARIOS = {
    "k1": (1, 2, 24, 64, 8, 2, 3, 1, 16, 0, False, "plain"),
    "k7-sinks0": (3, 2, 30, 59, 12, 0, 4, 7, 3, 1, True, "plain"),
    "k5-recent0": (3, 3, 20, 128, 6, 2, 0, 5, 16, 2, False, "plain"),
    "k30-none": (1, 1, 40, 59, 5, 0, 0, 30, 4, -7, True, "plain"),
    "c97-k50": (2, 3, 97, 59, 40, 4, 8, 50, 16, 3, True, "plain"),
    "c1025-k1": (2, 2, 1025, 128, 1000, 4, 32, 1, 16, 4, False, "plain"),
    "huge-positions": (2, 2, 64, 16, 20, 3, 5, 30, 8, 5, False, "huge"),
    "duplicate-positions": (2, 2, 64, 16, 20, 3, 5, 30, 8, 6, True, "dup"),
}


def make_compress_state(B, H, C, D, budget, k, dtype, positions, seed):
    held = lambda b, h: budget - 1 if (b + h) % 3 == 0 and B * H > 1 else budget + k  # noqa
    st = random_state(B, H, C, D, dtype, held=held, seed=seed)
    sp = st.slot_pos
    if positions == "huge":  # several radix digits, 2^40-sized gaps
        sp.copy_(torch.where(sp >= 0, sp * (1 << 40) + 12345, sp))
    elif positions == "dup":  # equal positions: (position, slot) order decides
        sp.copy_(torch.where(sp >= 0, sp // 5, sp))
    return st


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_compress(cuda_ops, policy, dtype, scenario):
    B, H, C, D, budget, sinks, recent, k, window, seed, strided, positions = SCENARIOS[scenario]
    st = make_compress_state(B, H, C, D, budget, k, dtype, positions, seed=7 + k)
    args = [*st, budget, sinks, recent, policy]
    kw = dict(cam_window=window, seed=seed)
    (want, _), (cpu_got, _), (got, _) = run3(cuda_ops, "compress", args, kw, strided)
    assert_states_equal(cpu_got[:6], want[:6])
    assert_states_equal(got[:6], want[:6])


@pytest.mark.parametrize("policy", ["weightedkv", "cam", "h2o"])
def test_compress_workspace_path(cuda_ops, policy):
    """C large enough that the per-row working set exceeds shared memory (global workspace)."""
    C, budget, k = 20000, 19990, 6
    st = random_state(1, 2, C, 8, torch.float16, held=budget + k, seed=11)
    args = [*st, budget, 4, 16, policy]
    a_cpu, a_cuda = to("cpu", args), to("cuda", args)
    cuda_ops.compress(*a_cpu)
    cuda_ops.compress(*a_cuda)
    assert_states_equal(cpu(a_cuda)[:6], a_cpu[:6])


@pytest.mark.parametrize("policy", POLICIES)
def test_compress_nan_inf_and_ties(cuda_ops, policy):
    st = random_state(2, 2, 16, 8, torch.float32, held=14, seed=10)
    st.scores[0, 0, st.slot_pos[0, 0] >= 0] = float("nan")
    st.scores[0, 1, 3] = float("nan")
    st.scores[1, 0, 5] = float("inf")
    st.last[1, 1, 2] = float("nan")
    st.scores[1, 1].zero_()  # all keys tie: oldest eligible first
    st.last[1, 1].zero_()
    args = [*st, 7, 1, 1, policy]
    (want, _), (cpu_got, _), (got, _) = run3(cuda_ops, "compress", args)
    assert_states_equal(cpu_got[:6], want[:6])
    assert_states_equal(got[:6], want[:6])


# ---------------------------------------------------------------------------------------------
# decode_attention


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("B,G,C,D", [(1, 1, 11, 64), (3, 3, 97, 59), (3, 4, 300, 128),
                                     (2, 12, 50, 32)])
@pytest.mark.parametrize("reduce", ["mean", "sum", "max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_attention(cuda_ops, dtype, reduce, B, G, C, D, strided):
    H = 2
    st = random_state(B, H, C, D, dtype, held=lambda b, h: C // 3 + 3 * h, seed=5)
    g = torch.Generator().manual_seed(6)
    query = torch.randn(B, H * G, D, generator=g).to(dtype)
    qpos = torch.tensor([3 * C, C, -1][:B])  # sees all / causal cut / padding row
    args = [query, st.keys, st.values, st.slot_pos, qpos, st.scores, st.counts, st.last,
            D ** -0.5]
    (want, out_want), (cpu_got, out_cpu), (got, out_got) = run3(
        cuda_ops, "decode_attention", args, dict(group_reduce=reduce), strided)
    assert out_got.shape == out_want.shape and out_got.dtype == dtype
    torch.testing.assert_close(out_got, out_want, **OUT_TOL[dtype])
    torch.testing.assert_close(out_got, out_cpu, **OUT_TOL[dtype])
    assert torch.equal(got[6], want[6])  # counts
    torch.testing.assert_close(got[5], want[5], **STAT_TOL)  # scores
    torch.testing.assert_close(got[7], want[7], **STAT_TOL)  # last
    assert torch.equal(got[3], want[3])


def test_decode_attention_sees_nothing(cuda_ops):
    """A valid query before every held position: out = 0, last = 0, scores/counts unchanged."""
    st = random_state(2, 2, 16, 8, torch.float16, held=10, seed=13)
    st.slot_pos.copy_(torch.where(st.slot_pos >= 0, st.slot_pos + 100, st.slot_pos))
    args = [torch.randn(2, 4, 8).half(), st.keys, st.values, st.slot_pos, torch.tensor([5, -1]),
            st.scores, st.counts, st.last, 0.3]
    (want, out_want), _, (got, out_got) = run3(cuda_ops, "decode_attention", args)
    assert torch.equal(out_got, out_want) and not out_got.any()
    for i in (5, 6, 7):
        assert torch.equal(got[i], want[i])


def test_decode_attention_many_splits_determinism(cuda_ops):
    """G=16, C=4000 on one row: the split decode kernel cuts the row into many splits (the old
    one-block kernel took its global-workspace path here); twice = same bits."""
    B, H, G, C, D = 1, 2, 16, 4000, 128
    st = random_state(B, H, C, D, torch.bfloat16, held=3500, seed=14)
    query = torch.randn(B, H * G, D).bfloat16()
    args = [query, st.keys, st.values, st.slot_pos, torch.tensor([10 ** 6]), st.scores,
            st.counts, st.last, D ** -0.5]
    a_cpu = to("cpu", args)
    out_cpu = cuda_ops.decode_attention(*a_cpu)
    outs = []
    for _ in range(2):
        a = to("cuda", args)
        outs.append((cuda_ops.decode_attention(*a).cpu(), cpu(a)))
    torch.testing.assert_close(outs[0][0], out_cpu, **OUT_TOL[torch.bfloat16])
    assert torch.equal(outs[0][1][6], a_cpu[6])
    torch.testing.assert_close(outs[0][1][5], a_cpu[5], **STAT_TOL)
    assert torch.equal(outs[0][0], outs[1][0])
    for x, y in zip(outs[0][1][:8], outs[1][1][:8]):  # every tensor argument
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# streams and argument checks


class _OnCuda:
    """The compiled ops run on CUDA copies of CPU arguments, mutations copied back (for
    helpers.stream, which builds its tensors on the CPU)."""

    def __init__(self, ops):
        self.ops = ops

    def __getattr__(self, name):
        fn = getattr(self.ops, name)

        def call(*args, **kw):
            dev = to("cuda", args)
            out = fn(*dev, **kw)
            for a, d in zip(args, dev):
                if isinstance(a, torch.Tensor):
                    a.copy_(d.cpu())
            return out
        return call


@pytest.mark.parametrize("policy", POLICIES)
def test_stream_matches_cpu(cuda_ops, policy):
    want = stream(cuda_ops, policy, steps=12, dtype=torch.float16, seed=1)
    got = stream(_OnCuda(cuda_ops), policy, steps=12, dtype=torch.float16, seed=1)
    assert_states_equal(got, want)


def test_mixed_devices_are_rejected(cuda_ops):
    st = list(random_state(1, 1, 4, 4, torch.float32, held=2, seed=0))
    st[0] = st[0].cuda()
    with pytest.raises(RuntimeError, match="compress: all tensors must be on one device"):
        cuda_ops.compress(*st, 3, 0, 0, "weightedkv")


# ---------------------------------------------------------------------------------------------
# attention features and block_attention (CUDA == reference within tolerance; deterministic)


@pytest.mark.parametrize("op", ["decode_attention", "block_attention"])
@pytest.mark.parametrize("window,softcap,with_sinks", [(0, 0.0, False), (6, 0.0, False),
                                                       (0, 2.0, False), (0, 0.0, True),
                                                       (5, 1.5, True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_features(cuda_ops, dtype, window, softcap, with_sinks, op):
    B, H, G, C, D, Q = 3, 2, 4, 40, 64, 6
    st = random_state(B, H, C, D, dtype, held=lambda b, h: 25 + 3 * h, seed=31, pos_range=60)
    g = torch.Generator().manual_seed(32)
    if op == "decode_attention":
        query = torch.randn(B, H * G, D, generator=g).to(dtype)
        qpos = torch.tensor([70, 30, -1])
    else:
        query = torch.randn(B, H * G, Q, D, generator=g).to(dtype)
        qpos = torch.tensor([[60 + i for i in range(Q)], [-1, -1, 0, 20, 25, 30], [-1] * Q])
    sinks = torch.randn(H * G, generator=g) if with_sinks else None
    args = [query, st.keys, st.values, st.slot_pos, qpos, st.scores, st.counts, st.last, 0.2]
    results = []
    for module, device in ((ref, "cpu"), (cuda_ops, "cpu"), (cuda_ops, "cuda")):
        a = to(device, args)
        kw = dict(window=window, softcap=softcap,
                  sinks=None if sinks is None else to(device, [sinks])[0])
        out = getattr(module, op)(*a, **kw)
        results.append((cpu(a), out.cpu()))
    (want, out_want), (cpu_got, out_cpu), (got, out_got) = results
    torch.testing.assert_close(out_got, out_want, **OUT_TOL[dtype])
    torch.testing.assert_close(out_got, out_cpu, **OUT_TOL[dtype])
    assert torch.equal(got[6], want[6])  # counts
    torch.testing.assert_close(got[5], want[5], **STAT_TOL)  # scores
    torch.testing.assert_close(got[7], want[7], **STAT_TOL)  # last
    # deterministic: a second run gives the same bits
    a = to("cuda", args)
    out2 = getattr(cuda_ops, op)(*a, window=window, softcap=softcap,
                            sinks=None if sinks is None else to("cuda", [sinks])[0])
    assert torch.equal(out2.cpu(), out_got)
    for x, y in zip(cpu(a)[:8], got[:8]):
        assert torch.equal(x, y)


def test_block_attention_long_chunk_workspace(cuda_ops):
    """G*C too large for shared memory (global workspace path), 129 queries."""
    B, H, G, C, D, Q = 1, 2, 8, 3000, 128, 129
    st = random_state(B, H, C, D, torch.bfloat16, held=2800, seed=33, pos_range=2900)
    query = torch.randn(B, H * G, Q, D).bfloat16()
    qpos = torch.arange(2800, 2800 + Q)[None]
    args = [query, st.keys, st.values, st.slot_pos, qpos, st.scores, st.counts, st.last,
            D ** -0.5]
    a_cpu = to("cpu", args)
    out_cpu = cuda_ops.block_attention(*a_cpu)
    a = to("cuda", args)
    out = cuda_ops.block_attention(*a).cpu()
    torch.testing.assert_close(out, out_cpu, **OUT_TOL[torch.bfloat16])
    assert torch.equal(cpu(a)[6], a_cpu[6])
    torch.testing.assert_close(cpu(a)[5], a_cpu[5], rtol=1e-4, atol=1e-6)


def test_cam_head_offset_on_cuda(cuda_ops):
    st = random_state(2, 4, 24, 8, torch.float16, held=20, seed=17)
    args = [*st, 10, 1, 2, "cam", 3, 11, 2]
    (want, _), (cpu_got, _), (got, _) = run3(cuda_ops, "compress", args)
    assert_states_equal(cpu_got[:6], want[:6])
    assert_states_equal(got[:6], want[:6])
