"""torch.library.opcheck on each op (schema incl. mutation annotations, fake/meta kernel, autograd
registration, AOT dispatch) for small configurations, the attention features included."""
import pytest
import torch

from helpers import compiled_ops, random_state


def op_args(name):
    """(args, kwargs) of one call of torch.ops.weightedkv.<name>."""
    st = list(random_state(2, 2, 12, 8, torch.float32, held=lambda b, h: 7 + h, seed=0))
    if name == "append":
        return [*st, torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8),
                torch.tensor([[40, 41, 42], [-1, 40, 41]])], {}
    if name == "accumulate":
        return [torch.rand(2, 4, 3, 12), st[5], torch.tensor([[10, 20, 40], [-1, 5, 30]]),
                *st[2:5], "sum"], {}
    if name == "compress":
        return [*st, 5, 1, 1, "weightedkv", 16, 0], {}
    if name == "compress-cam-offset":
        return [*st, 5, 1, 1, "cam", 3, 7, 4], {}
    if name.startswith("decode_attention"):
        args = [torch.randn(2, 4, 8), st[0], st[1], st[5], torch.tensor([30, -1]), *st[2:5],
                0.3, "max"]
        kwargs = dict(out=torch.empty(2, 4, 8))
    else:  # block_attention
        args = [torch.randn(2, 4, 3, 8), st[0], st[1], st[5],
                torch.tensor([[10, 20, 30], [-1, 4, 30]]), *st[2:5], 0.3, "mean"]
        kwargs = dict(out=torch.empty(2, 4, 3, 8))
    if name.endswith("features"):
        kwargs.update(window=5, softcap=2.5, sinks=torch.randn(4))
    return args, kwargs


NAMES = ["append", "accumulate", "compress", "compress-cam-offset", "decode_attention",
         "decode_attention-features", "block_attention", "block_attention-features"]


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(name):
    compiled_ops()  # skip when not built
    args, kwargs = op_args(name)
    op = getattr(torch.ops.weightedkv, name.split("-")[0]).default
    torch.library.opcheck(op, tuple(args), kwargs)
