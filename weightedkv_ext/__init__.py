"""WeightedKV: attention-score-weighted KV-cache merging for Hugging Face transformers.

``import weightedkv_ext`` loads the compiled ops (``torch.ops.weightedkv.*``); the public names are
``WeightedKVCache``, ``enable``, ``ops``, ``reference`` and ``models``.
"""
from __future__ import annotations

import importlib

from . import _loader  # noqa: F401  (loads the compiled library, registers torch.ops.weightedkv)
from . import ops, reference  # noqa: F401

__version__ = "0.1.0"

_LAZY = {
    "WeightedKVCache": ("cache", "WeightedKVCache"),
    "POLICIES": ("cache", "POLICIES"),
    "enable": ("attention", "enable"),
    "models": ("models", None),
    "data": ("data", None),
}


def __getattr__(name: str):
    # transformers is imported only when the integration is used.
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(f".{module_name}", __name__)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'weightedkv_ext' has no attribute {name!r}")


__all__ = ["WeightedKVCache", "POLICIES", "enable", "ops", "reference", "models", "data", "__version__"]
