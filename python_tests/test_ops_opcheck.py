"""torch.library.opcheck on each op (schema incl. mutation annotations, fake/meta kernel, autograd
registration, AOT dispatch) for one small configuration."""
import pytest
import torch

from helpers import compiled_ops, random_state


def op_args(name):
    st = list(random_state(2, 2, 12, 8, torch.float32, held=lambda b, h: 7 + h, seed=0))
    if name == "append":
        return [*st, torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8),
                torch.tensor([[40, 41, 42], [-1, 40, 41]])]
    if name == "accumulate":
        return [torch.rand(2, 4, 3, 12), st[5], torch.tensor([[10, 20, 40], [-1, 5, 30]]),
                *st[2:5], "sum"]
    if name == "compress":
        return [*st, 5, 1, 1, "weightedkv", 16, 0]
    return [torch.randn(2, 4, 8), st[0], st[1], st[5], torch.tensor([30, -1]), *st[2:5], 0.3,
            "max"]


@pytest.mark.parametrize("name", ["append", "accumulate", "compress", "decode_attention"])
def test_opcheck(name):
    compiled_ops()  # skip when not built
    torch.library.opcheck(getattr(torch.ops.weightedkv, name).default, tuple(op_args(name)))
