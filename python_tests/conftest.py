"""Shared pytest fixtures (helpers that are not fixtures live in helpers.py)."""
import pytest
import torch

from helpers import compiled_ops


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: one thread is fastest, and much faster on a busy machine (no OpenMP barriers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cuda_ops():
    """weightedkv_ext.ops with CUDA kernels; skips without a CUDA device or when the extension
    was built without the CUDA kernels."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    ops = compiled_ops()
    from weightedkv_ext import _loader
    if not _loader.cuda_built():
        pytest.skip("weightedkv_ext was built without the CUDA kernels (rebuild with a GPU "
                    "visible or FORCE_CUDA=1, e.g. scripts/gpu_check.sh)")
    return ops
