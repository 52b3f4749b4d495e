"""WeightedKV: attention-score-weighted KV-cache merging, for transformers and plain PyTorch.

``import weightedkv_ext`` loads the compiled ops (``torch.ops.weightedkv.*``) and, when transformers
is installed, registers the ``weightedkv`` attention as soon as transformers is imported (without
importing it: see ``_register.py``). Two doors to one engine:

* plain PyTorch: ``KVEngine`` (engine.py), one per attention layer, never imports transformers;
* transformers: ``WeightedKVCache`` + ``enable(model)`` (or ``attn_implementation="weightedkv"``).
"""
from __future__ import annotations

import importlib

from . import _loader  # noqa: F401  (loads the compiled library, registers torch.ops.weightedkv)
from . import _register, ops, policies, reference  # noqa: F401

__version__ = "0.1.0"

_register.install()

_LAZY = {
    "KVEngine": ("engine", "KVEngine"),
    "WeightedKVCache": ("cache", "WeightedKVCache"),
    "POLICIES": ("policies", "POLICIES"),
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


__all__ = ["KVEngine", "WeightedKVCache", "POLICIES", "enable", "ops", "policies", "reference",
           "models", "data", "__version__"]
