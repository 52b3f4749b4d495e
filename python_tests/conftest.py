"""Shared pytest fixtures (helpers that are not fixtures live in helpers.py)."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: one thread is fastest, and much faster on a busy machine (no OpenMP barriers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
