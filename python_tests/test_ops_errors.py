"""Bad input -> a Python exception whose message names the op, the argument and the bad value
(never a crash), for the kernels and the reference alike."""
import pytest
import torch

from helpers import impl, random_state

B, H, C, D, T, Q = 2, 2, 6, 4, 3, 2


def state(dtype=torch.float32):
    return list(random_state(B, H, C, D, dtype, held=4, seed=0))


def new_tokens(dtype=torch.float32):
    return [torch.zeros(B, H, T, D, dtype=dtype), torch.zeros(B, H, T, D, dtype=dtype),
            torch.arange(T).repeat(B, 1)]


def with_(args, i, value):
    args = list(args)
    args[i] = value
    return args


KEYS, VALUES, SCORES, COUNTS, LAST, SLOT_POS = range(6)


def compress_args(budget=4, sinks=1, recent=1, policy="weightedkv", **kw):
    return "compress", [*state(), budget, sinks, recent, policy], kw


def append_args(i=None, value=None):
    args = [*state(), *new_tokens()]
    return "append", (args if i is None else with_(args, i, value)), {}


def accumulate_args(i=None, value=None, **kw):
    st = state()
    args = [torch.rand(B, 2 * H, Q, C), st[SLOT_POS], torch.tensor([[5, 6]] * B), *st[2:5]]
    return "accumulate", (args if i is None else with_(args, i, value)), kw


def decode_args(i=None, value=None, **kw):
    st = state()
    args = [torch.randn(B, 2 * H, D), st[KEYS], st[VALUES], st[SLOT_POS], torch.tensor([9, 9]),
            *st[2:5], 0.5]
    return "decode_attention", (args if i is None else with_(args, i, value)), kw


def full_cache():
    st = state()
    st[SLOT_POS] = torch.arange(C).repeat(B, H, 1)
    return "append", [*st, *new_tokens()], {}


CASES = {
    # compress: scalar arguments
    "budget<=sinks+recent": (lambda: compress_args(8, 4, 4),
                             r"compress: budget must exceed sinks \+ recent, got budget=8, "
                             r"sinks=4, recent=4"),
    "negative budget": (lambda: compress_args(-1, 0, 0),
                        r"compress: budget must exceed sinks \+ recent, got budget=-1"),
    "negative sinks": (lambda: compress_args(4, -1, 1),
                       r"compress: sinks must be >= 0, got sinks=-1"),
    "negative recent": (lambda: compress_args(4, 1, -2),
                        r"compress: recent must be >= 0, got recent=-2"),
    "cam_window 0": (lambda: compress_args(policy="cam", cam_window=0),
                     r"compress: cam_window must be >= 1, got cam_window=0"),
    "unknown policy": (lambda: compress_args(policy="lru"),
                       r"compress: policy must be one of .*got 'lru'"),
    # compress: the cache tensors
    "keys rank": (lambda: ("compress", with_(compress_args()[1], KEYS, torch.zeros(B, H, C)), {}),
                  r"compress: keys must be a 4-D tensor"),
    "keys int dtype": (lambda: ("compress", with_(compress_args()[1], KEYS,
                                                  torch.zeros(B, H, C, D, dtype=torch.int32)), {}),
                       r"compress: keys must have dtype"),
    "values dtype": (lambda: ("compress", with_(compress_args()[1], VALUES,
                                                torch.zeros(B, H, C, D, dtype=torch.float16)), {}),
                     r"compress: values must have (the )?dtype"),
    "values shape": (lambda: ("compress", with_(compress_args()[1], VALUES,
                                                torch.zeros(B, H, C, D + 1)), {}),
                     r"compress: values must have shape"),
    "scores dtype": (lambda: ("compress", with_(compress_args()[1], SCORES,
                                                torch.zeros(B, H, C, dtype=torch.float64)), {}),
                     r"compress: scores must have dtype"),
    "counts shape": (lambda: ("compress", with_(compress_args()[1], COUNTS,
                                                torch.zeros(B, H, C + 1)), {}),
                     r"compress: counts must have shape"),
    "slot_pos dtype": (lambda: ("compress", with_(compress_args()[1], SLOT_POS,
                                                  torch.zeros(B, H, C, dtype=torch.int32)), {}),
                       r"compress: slot_pos must have dtype"),
    # append
    "append full cache": (full_cache, r"append: not enough free slots"),
    "new_keys dtype": (lambda: append_args(6, torch.zeros(B, H, T, D, dtype=torch.bfloat16)),
                       r"append: new_keys must have (the )?dtype"),
    "new_values rank": (lambda: append_args(7, torch.zeros(B, H, T)),
                        r"append: new_values must be a 4-D tensor"),
    "new_keys head_dim": (lambda: append_args(6, torch.zeros(B, H, T, D + 1)),
                          r"append: new_keys must have shape"),
    "new_pos shape": (lambda: append_args(8, torch.zeros(B, T + 1, dtype=torch.long)),
                      r"append: new_pos must have shape"),
    "new_pos dtype": (lambda: append_args(8, torch.zeros(B, T, dtype=torch.int32)),
                      r"append: new_pos must have dtype"),
    # accumulate
    "probs rank": (lambda: accumulate_args(0, torch.rand(B, 2 * H, C)),
                   r"accumulate: probs must be a 4-D tensor"),
    "probs C": (lambda: accumulate_args(0, torch.rand(B, 2 * H, Q, C + 1)),
                r"accumulate: probs must have shape"),
    "probs int": (lambda: accumulate_args(0, torch.ones(B, 2 * H, Q, C, dtype=torch.int64)),
                  r"accumulate: probs must have dtype"),
    "probs GQA": (lambda: accumulate_args(0, torch.rand(B, 3, Q, C)),
                  r"accumulate: the number of query heads Hq must be a positive multiple .*"
                  r"got Hq=3, H=2"),
    "query_pos shape": (lambda: accumulate_args(2, torch.zeros(B, Q + 1, dtype=torch.long)),
                        r"accumulate: query_pos must have shape"),
    "group_reduce": (lambda: accumulate_args(group_reduce="median"),
                     r"accumulate: group_reduce must be one of .*got 'median'"),
    "last dtype": (lambda: accumulate_args(5, torch.zeros(B, H, C, dtype=torch.float16)),
                   r"accumulate: last must have dtype"),
    # decode_attention
    "query dtype": (lambda: decode_args(0, torch.randn(B, 2 * H, D, dtype=torch.float16)),
                    r"decode_attention: query must have (the )?dtype"),
    "query head_dim": (lambda: decode_args(0, torch.randn(B, 2 * H, D + 1)),
                       r"decode_attention: query must have shape"),
    "query GQA": (lambda: decode_args(0, torch.randn(B, 3, D)),
                  r"decode_attention: the number of query heads Hq must be a positive multiple "
                  r".*got Hq=3, H=2"),
    "query_pos rank": (lambda: decode_args(4, torch.zeros(B, 1, dtype=torch.long)),
                       r"decode_attention: query_pos must be a 1-D tensor"),
    "decode group_reduce": (lambda: decode_args(group_reduce="avg"),
                            r"decode_attention: group_reduce must be one of .*got 'avg'"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("which", ["reference", "ops"])
def test_bad_input_raises_clear_error(which, case):
    make, pattern = CASES[case]
    fn, args, kwargs = make()
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        getattr(impl(which), fn)(*args, **kwargs)
    after = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(torch.equal(x, y) for x, y in zip(before, after))  # nothing was written


@pytest.mark.parametrize("which", ["reference", "ops"])
def test_device_mismatch_raises(which):
    if which == "ops" and not torch.cuda.is_available():
        # a CPU + meta mix dispatches to the (non-validating) fake kernel, not to the CPU one
        pytest.skip("needs a second real device (CUDA) to mix with CPU")
    other = "meta" if which == "reference" else "cuda"
    st = state()
    st[VALUES] = st[VALUES].to(other)
    with pytest.raises((RuntimeError, ValueError), match=r"compress: .*device.*values"):
        impl(which).compress(*st, 4, 1, 1, "weightedkv")
