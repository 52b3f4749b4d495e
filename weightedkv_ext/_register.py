"""Register the ``weightedkv`` attention with transformers on ``import weightedkv_ext``, lazily.

Importing transformers' ``modeling_utils`` costs seconds, which op-only users (and the plain
PyTorch door) should not pay. So ``install()`` does not import transformers: it registers at once
if transformers' registries are already loaded, and otherwise adds a one-shot import hook that
registers right after ``transformers.modeling_utils`` (``AttentionInterface``) and
``transformers.masking_utils`` (``AttentionMaskInterface``) are first imported. What is
registered is a trampoline that imports ``weightedkv_ext.attention`` (which then registers the real
functions) on first use, so no package module is imported while transformers is mid-import.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

NAME = "weightedkv"


def _attention(*args, **kwargs):
    from .attention import weightedkv_attention_forward
    return weightedkv_attention_forward(*args, **kwargs)


def _mask(*args, **kwargs):
    from .attention import weightedkv_mask
    return weightedkv_mask(*args, **kwargs)


def _register_attention(module) -> None:
    if NAME not in module.AttentionInterface._global_mapping:
        module.AttentionInterface.register(NAME, _attention)


def _register_mask(module) -> None:
    if NAME not in module.AttentionMaskInterface._global_mapping:
        module.AttentionMaskInterface.register(NAME, _mask)


_HOOKS = {"transformers.modeling_utils": _register_attention,
          "transformers.masking_utils": _register_mask}


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then the registration of that module."""

    def __init__(self, inner, after):
        self.inner, self.after = inner, after

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        self.after(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loaders of the two transformers modules (once each)."""

    def __init__(self, pending: dict):
        self.pending = pending

    def find_spec(self, fullname, path, target=None):
        after = self.pending.pop(fullname, None)
        if after is None:
            return None
        if not self.pending:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:  # the spec the other finders would give
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, after)
                return spec
        return None


def install() -> None:
    """Register now or when transformers is imported; a no-op without transformers."""
    pending = {}
    for name, register in _HOOKS.items():
        if name in sys.modules:
            register(sys.modules[name])
        else:
            pending[name] = register
    if not pending or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    try:
        if importlib.util.find_spec("transformers") is None:  # finds, does not import
            return
    except (ImportError, ValueError):  # a broken or blocked installation: nothing to register
        return
    sys.meta_path.insert(0, _Finder(pending))
