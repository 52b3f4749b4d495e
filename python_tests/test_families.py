"""Every model family transformers ships with an attention interface, each with its special
attention features switched on (sliding windows small enough to matter, soft-capping, learned
sinks): with a budget larger than the sequence, the weightedkv attention + WeightedKVCache equals
eager + DynamicCache within fp32 tolerance (prefill in several chunks, then decode steps), or
``enable()`` refuses the model with a clear error. Tiny random configs, a few dozen tokens.
"""
from __future__ import annotations

import pytest
import torch

weightedkv_ext = pytest.importorskip("weightedkv_ext",
                                     reason="weightedkv_ext is not built (bash scripts/build.sh)")
import transformers  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from weightedkv_ext import WeightedKVCache  # noqa: E402

W = 5  # sliding window: much shorter than the 14-token prompt
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=256)

# family -> (model class, config class, config overrides); features noted per line.
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "qwen2-sliding": ("Qwen2ForCausalLM", "Qwen2Config",
                      dict(use_sliding_window=True, sliding_window=W, max_window_layers=1)),
    "qwen3-sliding": ("Qwen3ForCausalLM", "Qwen3Config",
                      dict(use_sliding_window=True, sliding_window=W, max_window_layers=1)),
    "mistral-sliding": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=W)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {}),
    "gemma2-sliding-softcap": ("Gemma2ForCausalLM", "Gemma2Config",
                               dict(sliding_window=W, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=5.0, query_pre_attn_scalar=8)),
    "gemma3-sliding": ("Gemma3ForCausalLM", "Gemma3TextConfig",
                       dict(sliding_window=W, layer_types=["sliding_attention",
                                                           "full_attention"],
                            query_pre_attn_scalar=8)),
    "phi3-sliding": ("Phi3ForCausalLM", "Phi3Config", dict(sliding_window=W, pad_token_id=0)),
    "gpt-neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(rotary_pct=0.5)),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {}),
    "gpt-oss-sinks-sliding": ("GptOssForCausalLM", "GptOssConfig",
                              dict(sliding_window=W, num_local_experts=4, num_experts_per_tok=2,
                                   rope_parameters={"rope_type": "default",
                                                    "rope_theta": 10000.0})),
    "starcoder2-sliding": ("Starcoder2ForCausalLM", "Starcoder2Config", dict(sliding_window=W)),
    "cohere": ("CohereForCausalLM", "CohereConfig", {}),
}
GPT_NEOX_NAMES = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                      intermediate_size=64, vocab_size=64, max_position_embeddings=256)


def build(family: str):
    model_cls, cfg_cls, extra = FAMILIES[family]
    kwargs = dict(GPT_NEOX_NAMES if family == "gpt-neox" else COMMON)
    kwargs.update(extra)
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)._from_config(cfg, attn_implementation="eager")
    model = model.eval().requires_grad_(False)
    if family.startswith("gpt-oss"):  # the learned sinks start at zero: make them matter
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2)
    return model


def run(model, cache, ids, prefill: int):
    """Prefill ``prefill`` tokens, then feed the rest one token at a time; all logits."""
    out = [model(ids[:, :prefill], **{"past_key_values": cache}).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    return torch.cat(out, 1)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_equals_eager_without_compression(family):
    model = build(family)
    ids = torch.randint(1, 64, (2, 18), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = run(model, DynamicCache(config=model.config), ids, prefill=14)
        weightedkv_ext.enable(model)
        got = run(model, WeightedKVCache(budget=10 ** 6, chunk_size=4), ids, prefill=14)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sliding_layers_keep_exactly_their_window():
    model = weightedkv_ext.enable(build("mistral-sliding"))
    cache = WeightedKVCache(budget=10 ** 6, chunk_size=4)
    with torch.no_grad():
        model(torch.randint(1, 64, (1, 30)), past_key_values=cache)
    assert cache.held_tokens().eq(W).all()  # every Mistral layer slides


def test_enable_refuses_models_it_cannot_serve():
    cfg = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6,
        n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1)
    mla = transformers.DeepseekV3ForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"enable: DeepseekV3ForCausalLM has value head_dim 6 "
                                         r"!= key head_dim 12 .*latent attention"):
        weightedkv_ext.enable(mla)
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16))
    with pytest.raises(ValueError, match=r"enable: BartForConditionalGeneration is an "
                                         r"encoder-decoder model"):
        weightedkv_ext.enable(bart)


def test_softcap_model_without_a_weightedkv_cache_says_what_to_do():
    model = weightedkv_ext.enable(build("gemma2-sliding-softcap"))
    with torch.no_grad(), pytest.raises(ValueError, match=r"weightedkv attention: this model "
                                                          r"uses softcap.*WeightedKVCache"):
        model(torch.randint(1, 64, (1, 6)))
