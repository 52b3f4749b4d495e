"""The plain-PyTorch door (#18): examples/plain_pytorch_decoder.py with KVEngine equals the same
decoder with a concat cache when nothing is compressed, and equals the transformers door (the
same weights in a LlamaForCausalLM + WeightedKVCache) for every policy when compressing."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

weightedkv_ext = pytest.importorskip("weightedkv_ext",
                                     reason="weightedkv_ext is not built (bash scripts/build.sh)")
from weightedkv_ext import policies  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "plain_pytorch_decoder", os.path.join(ROOT, "examples", "plain_pytorch_decoder.py"))
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


def decoder(seed=0):
    torch.manual_seed(seed)
    model = example.Decoder(vocab=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                            hidden=64).eval()
    for p in model.parameters():  # larger weights: attention far from uniform
        p.data.normal_(0, 0.3)
    return model


def stream(model, caches, ids, prefill):
    """Logits of a prefill of ``prefill`` tokens, then one token at a time."""
    model.seen = 0
    with torch.inference_mode():
        out = [model(ids[:, :prefill], caches)]
        out += [model(ids[:, t:t + 1], caches) for t in range(prefill, ids.shape[1])]
    return torch.cat(out, 1)


IDS = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))


def test_engine_equals_concat_cache_when_nothing_is_compressed():
    model = decoder()
    want = stream(model, example.make_caches(2), IDS, prefill=25)
    got = stream(model, example.make_caches(2, budget=64, chunk_size=8), IDS, prefill=25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gen = model.generate(IDS[:, :10], example.make_caches(2, budget=100), 20)
    assert torch.equal(gen, model.generate(IDS[:, :10], example.make_caches(2), 20))


def llama_with_the_same_weights(model):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      rms_norm_eps=1e-6, max_position_embeddings=1024, tie_word_embeddings=False)
    llama = LlamaForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.layers):
        pre = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[pre + f"self_attn.{n}.weight"] = getattr(block.self_attn, n).weight
        for n in ("gate_proj", "up_proj", "down_proj"):
            sd[pre + f"mlp.{n}.weight"] = getattr(block, n).weight
        sd[pre + "input_layernorm.weight"] = block.input_layernorm.weight
        sd[pre + "post_attention_layernorm.weight"] = block.post_attention_layernorm.weight
    missing, unexpected = llama.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    return weightedkv_ext.enable(llama)


@pytest.mark.parametrize("policy", policies.POLICIES)
def test_plain_door_equals_the_transformers_door(policy):
    model = decoder()
    llama = llama_with_the_same_weights(model)
    kw = dict(budget=12, sinks=2, recent=3, policy=policy, chunk_size=4)
    got = stream(model, example.make_caches(2, **kw), IDS, prefill=25)
    cache = weightedkv_ext.WeightedKVCache(**kw)
    with torch.inference_mode():
        want = [llama(IDS[:, :25], **cache.as_kwargs()).logits]
        want += [llama(IDS[:, t:t + 1], **cache.as_kwargs()).logits for t in range(25, 40)]
    torch.testing.assert_close(got, torch.cat(want, 1), rtol=1e-4, atol=1e-4)
    if policy != "full":
        assert cache.held_tokens().eq(12).all()
