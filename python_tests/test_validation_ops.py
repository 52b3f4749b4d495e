"""Argument validation of the compiled ops beyond test_ops_errors.py: integer overflow of scalar
arguments, memory aliasing of the tensors written in place, non-finite scale, names with NUL
bytes, wrong Python types, huge dimensions; and empty tensors, which are valid and change nothing.

Every rejected call raises a Python exception naming the op, the argument and the bad value, and
leaves every tensor argument unchanged (bit for bit).
"""
from __future__ import annotations

import pytest
import torch

from helpers import compiled_ops, random_state, ref

B, H, C, D, T, Q = 2, 2, 8, 4, 3, 2
KEYS, VALUES, SCORES, COUNTS, LAST, SLOT_POS = range(6)
NEW_KEYS, NEW_VALUES, NEW_POS = range(6, 9)
BIG = 2 ** 62


def state():
    return list(random_state(B, H, C, D, torch.float32, held=5, seed=0, pos_range=5))


def append_args():
    return [*state(), torch.randn(B, H, T, D), torch.randn(B, H, T, D),
            torch.arange(5, 5 + T).repeat(B, 1)]


def accumulate_args():
    st = state()
    return [torch.rand(B, 2 * H, Q, C), st[SLOT_POS], torch.tensor([[5, 6]] * B),
            st[SCORES], st[COUNTS], st[LAST]]


def decode_args(scale=0.5):
    st = state()
    return [torch.randn(B, 2 * H, D), st[KEYS], st[VALUES], st[SLOT_POS], torch.tensor([9, 9]),
            st[SCORES], st[COUNTS], st[LAST], scale]


def compress_args(budget=4, sinks=1, recent=1, policy="weightedkv"):
    return [*state(), budget, sinks, recent, policy]


def replaced(args, i, make):
    """args with args[i] = make(args) (make sees the original list, e.g. to alias a tensor)."""
    args = list(args)
    args[i] = make(args)
    return args


def shifted_views(args, i, j):
    """args[i], args[j] as views of one buffer, shifted by one element (partial overlap)."""
    args = list(args)
    n = args[i].numel()
    buf = torch.zeros(n + 1, dtype=args[i].dtype)
    args[i], args[j] = buf[:n].view(args[i].shape), buf[1:].view(args[j].shape)
    return args


def expanded(shape, value=0.0):
    """A tensor of `shape` whose elements all share one float (stride 0 everywhere)."""
    return torch.tensor(value).expand(*shape)


CASES = {
    # -- scalar arguments -----------------------------------------------------------------------
    "sinks+recent overflow int64": (
        "compress", lambda: compress_args(5, BIG, BIG),
        rf"compress: budget must exceed sinks \+ recent, got budget=5, sinks={BIG}, recent={BIG}"),
    "sinks = recent = int64 max": (
        "compress", lambda: compress_args(5, 2 ** 63 - 1, 2 ** 63 - 1),
        r"compress: budget must exceed sinks \+ recent, got budget=5, sinks=9223372036854775807"),
    "sinks > budget, recent 0": (
        "compress", lambda: compress_args(5, 6, 0),
        r"compress: budget must exceed sinks \+ recent, got budget=5, sinks=6, recent=0"),
    "budget below int64 min": (
        "compress", lambda: compress_args(-2 ** 63, 0, 0),
        r"compress: budget must exceed sinks \+ recent, got budget=-9223372036854775808"),
    "budget beyond int64": (
        "compress", lambda: compress_args(2 ** 64, 0, 0),
        r"weightedkv::compress\(\) Expected a value of type 'int' for argument 'budget'"),
    "budget float": (
        "compress", lambda: compress_args(4.0),
        r"weightedkv::compress\(\) Expected a value of type 'int' for argument 'budget' but "
        r"instead found type 'float'"),
    "policy None": (
        "compress", lambda: compress_args(policy=None),
        r"weightedkv::compress\(\) Expected a value of type 'str' for argument 'policy'"),
    "policy wrong case": (
        "compress", lambda: compress_args(policy="WeightedKV"),
        r"compress: policy must be one of .*got 'WeightedKV'"),
    "policy empty": ("compress", lambda: compress_args(policy=""),
                     r"compress: policy must be one of .*got ''"),
    "policy with NUL": (
        "compress", lambda: compress_args(policy="weightedkv\0evil"),
        r"compress: policy must be one of .*got 'weightedkv\\0evil'"),
    "group_reduce with NUL": (
        "accumulate", lambda: accumulate_args() + ["sum\0"],
        r"accumulate: group_reduce must be one of .*got 'sum\\0'"),
    "cam_window negative": (
        "compress", lambda: compress_args(policy="cam") + [-3],
        r"compress: cam_window must be >= 1, got cam_window=-3"),
    "scale inf": ("decode_attention", lambda: decode_args(float("inf")),
                  r"decode_attention: scale must be a finite float32 number, got scale=inf"),
    "scale nan": ("decode_attention", lambda: decode_args(float("nan")),
                  r"decode_attention: scale must be a finite float32 number, got scale=nan"),
    "scale beyond float32": ("decode_attention", lambda: decode_args(1e39),
                             r"decode_attention: scale must be a finite float32 number, got "
                             r"scale=1e\+39"),
    "scale string": ("decode_attention", lambda: decode_args("0.5"),
                     r"weightedkv::decode_attention\(\) Expected a value of type 'float' for "
                     r"argument 'scale'"),
    "keys not a tensor": (
        "compress", lambda: replaced(compress_args(), KEYS, lambda a: a[KEYS].numpy()),
        r"weightedkv::compress\(\) Expected a value of type 'Tensor' for argument 'keys'"),
    # -- tensors written in place must not alias --------------------------------------------------
    "append: values is keys": (
        "append", lambda: replaced(append_args(), VALUES, lambda a: a[KEYS]),
        r"append: keys and values share memory, but both are written in place"),
    "append: values a view of keys": (
        "append", lambda: replaced(append_args(), VALUES, lambda a: a[KEYS].view_as(a[KEYS])),
        r"append: keys and values share memory"),
    "append: counts overlaps scores": (
        "append", lambda: shifted_views(append_args(), SCORES, COUNTS),
        r"append: scores and counts share memory"),
    "append: new_keys is a view of keys": (
        "append", lambda: replaced(append_args(), NEW_KEYS, lambda a: a[KEYS][:, :, :T]),
        r"append: new_keys shares memory with keys, which is written in place"),
    "append: expanded slot_pos": (
        "append", lambda: replaced(append_args(), SLOT_POS,
                                   lambda a: torch.full((B, H, 1), -1).expand(B, H, C)),
        r"append: slot_pos is written in place but several of its elements share memory"),
    "append: expanded keys": (
        "append", lambda: replaced(append_args(), KEYS, lambda a: expanded((B, H, C, D))),
        r"append: keys is written in place but several of its elements share memory"),
    "accumulate: last is scores": (
        "accumulate", lambda: replaced(accumulate_args(), 5, lambda a: a[3]),
        r"accumulate: scores and last share memory"),
    "accumulate: probs aliases counts": (
        "accumulate", lambda: replaced(accumulate_args(), 0,
                                       lambda a: a[4][:, :, None].expand(B, H, Q, C)),
        r"accumulate: probs shares memory with counts"),
    "accumulate: expanded scores": (
        "accumulate", lambda: replaced(accumulate_args(), 3, lambda a: expanded((B, H, C))),
        r"accumulate: scores is written in place but several of its elements share memory"),
    "decode: counts is scores": (
        "decode_attention", lambda: replaced(decode_args(), 6, lambda a: a[5]),
        r"decode_attention: scores and counts share memory"),
    "decode: last aliases keys": (
        "decode_attention", lambda: replaced(decode_args(), 7,
                                             lambda a: a[1].view(-1)[:B * H * C].view(B, H, C)),
        r"decode_attention: keys shares memory with last"),
    "decode: expanded last": (
        "decode_attention", lambda: replaced(decode_args(), 7, lambda a: expanded((B, H, C))),
        r"decode_attention: last is written in place but several of its elements share memory"),
    "compress: values is keys": (
        "compress", lambda: replaced(compress_args(), VALUES, lambda a: a[KEYS]),
        r"compress: keys and values share memory"),
    "compress: expanded counts": (
        "compress", lambda: replaced(compress_args(), COUNTS, lambda a: expanded((B, H, C))),
        r"compress: counts is written in place but several of its elements share memory"),
    # -- shapes / ranks / dtypes not covered by test_ops_errors.py --------------------------------
    "append: new_pos float": (
        "append", lambda: replaced(append_args(), NEW_POS, lambda a: a[NEW_POS].float()),
        r"append: new_pos must have dtype Long"),
    "append: new_keys other batch": (
        "append", lambda: replaced(append_args(), NEW_KEYS, lambda a: torch.zeros(B + 1, H, T, D)),
        r"append: new_keys must have shape \[B, H, T, D\]"),
    "append: new_values other T": (
        "append", lambda: replaced(append_args(), NEW_VALUES,
                                   lambda a: torch.zeros(B, H, T + 1, D)),
        r"append: new_values must have shape \[B, H, T, D\]"),
    "append: keys float64": (
        "append", lambda: replaced(append_args(), KEYS, lambda a: a[KEYS].double()),
        r"append: keys must have dtype float32, float16 or bfloat16, got Double"),
    "accumulate: slot_pos rank": (
        "accumulate", lambda: replaced(accumulate_args(), 1, lambda a: a[1][0]),
        r"accumulate: slot_pos must be a 3-D tensor"),
    "accumulate: query_pos int32": (
        "accumulate", lambda: replaced(accumulate_args(), 2, lambda a: a[2].int()),
        r"accumulate: query_pos must have dtype Long"),
    "accumulate: probs float64": (
        "accumulate", lambda: replaced(accumulate_args(), 0, lambda a: a[0].double()),
        r"accumulate: probs must have dtype float32, float16 or bfloat16, got Double"),
    "accumulate: probs other batch": (
        "accumulate", lambda: replaced(accumulate_args(), 0,
                                       lambda a: torch.rand(B + 1, 2 * H, Q, C)),
        r"accumulate: probs must have shape \[B, Hq, Q, C\] with B = 2"),
    "accumulate: zero query heads": (
        "accumulate", lambda: replaced(accumulate_args(), 0, lambda a: torch.rand(B, 0, Q, C)),
        r"accumulate: the number of query heads Hq must be a positive multiple .*got Hq=0, H=2"),
    "decode: query rank 4": (
        "decode_attention", lambda: replaced(decode_args(), 0, lambda a: a[0][:, :, None]),
        r"decode_attention: query must be a 3-D tensor \[B, Hq, D\]"),
    "decode: query other batch": (
        "decode_attention", lambda: replaced(decode_args(), 0, lambda a: torch.randn(1, 2 * H, D)),
        r"decode_attention: query must have shape \[B, Hq, D\] with B = 2"),
    "decode: query_pos [B, 1]": (
        "decode_attention", lambda: replaced(decode_args(), 4, lambda a: a[4][:, None]),
        r"decode_attention: query_pos must be a 1-D tensor"),
    "decode: values other head_dim": (
        "decode_attention", lambda: replaced(decode_args(), 2,
                                             lambda a: torch.zeros(B, H, C, D + 1)),
        r"decode_attention: values must have shape \[B, H, C, D\]"),
    "decode: slot_pos float": (
        "decode_attention", lambda: replaced(decode_args(), 3, lambda a: a[3].float()),
        r"decode_attention: slot_pos must have dtype Long"),
    "compress: keys rank 5": (
        "compress", lambda: replaced(compress_args(), KEYS, lambda a: a[KEYS][None]),
        r"compress: keys must be a 4-D tensor \[B, H, C, D\], got shape \[1, 2, 2, 8, 4\]"),
    "compress: last int": (
        "compress", lambda: replaced(compress_args(), LAST, lambda a: a[LAST].long()),
        r"compress: last must have dtype Float, got Long"),
    "compress: slot count over int32": (
        "compress", lambda: [expanded((1, 1, 2 ** 31, 1)), expanded((1, 1, 2 ** 31, 1)),
                             expanded((1, 1, 2 ** 31)), expanded((1, 1, 2 ** 31)),
                             expanded((1, 1, 2 ** 31)),
                             torch.full((1, 1, 1), -1).expand(1, 1, 2 ** 31), 4, 1, 1, "h2o"],
        r"compress: C too large: 2147483648"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_call_raises_and_changes_nothing(case):
    ops = compiled_ops()
    name, make, pattern = CASES[case]
    args = make()
    small = [isinstance(a, torch.Tensor) and a.numel() <= 10 ** 6 for a in args]  # not 2^31
    before = [a.clone() if s else None for a, s in zip(args, small)]
    with pytest.raises((RuntimeError, ValueError, TypeError), match=pattern):
        getattr(ops, name)(*args)
    for a, b in zip(args, before):
        if b is not None:
            assert torch.equal(a, b)


MIXED_DEVICE = {  # op, its args, the index of the tensor moved to the meta device, its name
    "append new_values": ("append", append_args, NEW_VALUES, "new_values"),
    "append keys": ("append", append_args, KEYS, "keys"),
    "accumulate probs": ("accumulate", accumulate_args, 0, "probs"),
    "accumulate last": ("accumulate", accumulate_args, 5, "last"),
    "compress values": ("compress", compress_args, VALUES, "values"),
    "compress slot_pos": ("compress", compress_args, SLOT_POS, "slot_pos"),
    "decode_attention query_pos": ("decode_attention", decode_args, 4, "query_pos"),
    "decode_attention counts": ("decode_attention", decode_args, 6, "counts"),
}


@pytest.mark.parametrize("case", list(MIXED_DEVICE))
def test_meta_and_cpu_tensors_mixed_are_rejected(case):
    """A meta tensor among CPU ones dispatches to the fake kernel (ops.py), which must reject the
    mix like the real kernels instead of silently doing nothing."""
    ops = compiled_ops()
    name, make, i, arg = MIXED_DEVICE[case]
    args = make()
    args[i] = args[i].to("meta")
    before = [a.clone() if isinstance(a, torch.Tensor) and a.device.type == "cpu" else None
              for a in args]
    with pytest.raises(RuntimeError, match=rf"{name}: all tensors must be on one device, but "
                                           rf".*\b{arg} is on meta"):
        getattr(ops, name)(*args)
    for a, b in zip(args, before):
        if b is not None:
            assert torch.equal(a, b)


def test_interleaved_keys_and_values_are_accepted():
    """Distinct non-overlapping views of one buffer (K and V interleaved) are valid."""
    ops = compiled_ops()
    st = state()
    kv = torch.zeros(B, H, C, 2, D)
    kv[:, :, :, 0] = st[KEYS]
    kv[:, :, :, 1] = st[VALUES]
    args = [kv[:, :, :, 0], kv[:, :, :, 1], *st[2:]]
    want = [t.clone() for t in st]
    new = (torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.arange(5, 5 + T).repeat(B, 1))
    ops.append(*args, *new)
    ops.compress(*args, 4, 1, 1, "weightedkv")
    ref.append(*want, *new)
    ref.compress(*want, 4, 1, 1, "weightedkv")
    for g, w in zip(args, want):
        assert torch.equal(g, w)


def test_huge_budget_keeps_everything():
    ops = compiled_ops()
    st = state()
    want = [t.clone() for t in st]
    ops.compress(*st, 2 ** 63 - 1, BIG, BIG - 2, "cam")
    assert all(torch.equal(a, b) for a, b in zip(st, want))


EMPTY = {  # name: (B, H, G, C, D, T)
    "B=0": (0, 2, 2, 5, 4, 3),
    "C=0": (2, 2, 2, 0, 4, 3),
    "D=0": (2, 2, 2, 5, 0, 3),
    "T=0": (2, 2, 2, 5, 4, 0),
    "H=0": (2, 0, 1, 5, 4, 3),
}


@pytest.mark.parametrize("empty", list(EMPTY))
@pytest.mark.parametrize("policy", ["weightedkv", "cam", "tova"])
def test_empty_tensors_are_valid(empty, policy):
    """Zero-size dimensions: every op runs and does what the contract says (nothing to do)."""
    ops = compiled_ops()
    Bz, Hz, G, Cz, Dz, Tz = EMPTY[empty]
    st = ref.new_state(Bz, Hz, Cz, Dz)
    if Cz:
        st.slot_pos[..., :2] = torch.tensor([0, 1])
    pos = torch.arange(2, 2 + Tz).repeat(Bz, 1)
    if Cz == 0:
        pos.fill_(-1)  # padding needs no slot
    ops.append(*st, torch.randn(Bz, Hz, Tz, Dz), torch.randn(Bz, Hz, Tz, Dz), pos)
    ops.accumulate(torch.rand(Bz, Hz * G, Tz, Cz), st.slot_pos, pos, st.scores, st.counts, st.last)
    out = ops.decode_attention(torch.randn(Bz, Hz * G, Dz), st.keys, st.values, st.slot_pos,
                               torch.full((Bz,), 7), st.scores, st.counts, st.last, 1.0)
    assert out.shape == (Bz, Hz * G, Dz)
    held_before = (st.slot_pos >= 0).sum(-1)
    ops.compress(*st, 3, 1, 1, policy)
    assert torch.equal((st.slot_pos >= 0).sum(-1), held_before.clamp(max=3))
    if Dz == 0 and Bz * Hz:
        assert st.counts.sum() > 0  # attention over zero-dimensional keys is uniform, not skipped


def test_append_to_a_full_cache_of_zero_slots_is_an_error():
    ops = compiled_ops()
    st = ref.new_state(1, 1, 0, 4)
    with pytest.raises(RuntimeError, match=r"append: not enough free slots in batch row 0, head 0: "
                                           r"1 new tokens but only 0 free slots \(capacity C=0\)"):
        ops.append(*st, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.tensor([[0]]))
