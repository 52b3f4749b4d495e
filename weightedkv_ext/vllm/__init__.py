"""WeightedKV inside vLLM: a ``vllm.general_plugins`` plugin (prototype on vLLM's CPU build).

Installed with the package (entry point ``weightedkv = weightedkv_ext.vllm:register``); vLLM calls
``register()`` in every process it starts. With ``$WEIGHTEDKV_VLLM`` set (e.g. ``budget=256``,
see ``settings``) it replaces vLLM's CPU attention backend by
``backend.WeightedKVAttentionBackend``, which keeps a WeightedKV-compressed cache of ``budget``
tokens per request, layer and KV head. Run vLLM with ``enable_prefix_caching=False`` (tested with
``enforce_eager=True``). Design, limits and measurements: docs/serving.md. ``register()`` imports
vLLM only when the variable is set.
"""
from __future__ import annotations

from .settings import ENV, Settings, from_env, parse  # noqa: F401

NAME = "WEIGHTEDKV"  # backend.NAME (that module imports vLLM)
BACKEND = "weightedkv_ext.vllm.backend.WeightedKVAttentionBackend"


def register() -> None:
    """vLLM entry point: select the WeightedKV backend when ``$WEIGHTEDKV_VLLM`` is set."""
    settings = from_env()  # raises on a malformed value, naming the key
    if settings is None:
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if not current_platform.is_cpu():
        raise NotImplementedError(
            f"weightedkv_ext.vllm: only vLLM's CPU build is supported so far (this platform is "
            f"{type(current_platform).__name__}); unset {ENV} (docs/serving.md, 'CUDA')")
    # The attention layer looks its backend up by get_name() in the registry's enum, so the name
    # is registered first; the CPU platform always picks CPU_ATTN (vllm/platforms/cpu.py,
    # get_attn_backend_cls), and the registry's override of that name replaces it.
    if NAME not in AttentionBackendEnum.__members__:
        register_backend(NAME, BACKEND)
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)
