"""A CUDA build registers a CUDA kernel for every op (no GPU needed: dispatch-table check)."""
import pytest
import torch

from helpers import compiled_ops

OPS = ("append", "accumulate", "compress", "decode_attention")


def test_cuda_build_registers_every_op():
    compiled_ops()
    from weightedkv_ext import _loader
    if not _loader.cuda_built():
        pytest.skip("weightedkv_ext was built without the CUDA kernels (CPU-only build, e.g. "
                    "scripts/build.sh; FORCE_CUDA=1 builds them without a GPU)")
    missing = [op for op in OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"weightedkv::{op}", "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"
    for op in OPS:  # the CPU kernels stay registered next to them
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"weightedkv::{op}", "CPU"), op
