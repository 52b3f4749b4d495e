"""Loads the compiled library ``weightedkv_ext._C``, which registers ``torch.ops.weightedkv.*``."""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing registers the op schemas and kernels)
except ImportError as exc:  # pragma: no cover - depends on the build state
    raise ImportError(
        "weightedkv_ext: the compiled extension weightedkv_ext._C is missing or failed to load "
        f"({exc}). Build it from the repository root with `bash scripts/build.sh` (editable, "
        "CPU-only) or `pip install --no-build-isolation .`."
    ) from exc


def cuda_built() -> bool:
    """True if the library was built with the CUDA kernels (the ops have a CUDA kernel)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("weightedkv::compress", "CUDA")


__all__ = ["cuda_built"]
