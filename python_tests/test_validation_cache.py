"""Argument and usage validation of the integration (WeightedKVCache, enable) beyond
test_cache.py: wrong Python types, a batch-size change mid-stream and a cache reused by a model
of another shape (KV heads, head_dim, dtype) raise a clear error naming WeightedKVCache, the
argument and the value, change nothing, and the cache keeps working for its own model.

``tiny_llama`` is also used by test_long_run.py and test_determinism.py.
"""
from __future__ import annotations

import pytest
import torch

weightedkv_ext = pytest.importorskip("weightedkv_ext",
                                     reason="weightedkv_ext is not built (bash scripts/build.sh)")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from weightedkv_ext import WeightedKVCache  # noqa: E402
from weightedkv_ext.attention import WeightedKVMask, weightedkv_attention_forward  # noqa: E402


def tiny_llama(layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
               head_dim: int = 8, dtype=torch.float32, seed: int = 0):
    """A random Llama small enough for long CPU runs: vocab 128, `layers` x hidden 32."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=1 << 20, initializer_range=0.1)
    model = LlamaForCausalLM(cfg).eval().to(dtype)
    return weightedkv_ext.enable(model)


def ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def snapshot(cache):
    """Everything a forward may change: per layer the six slot tensors, row_seen, seen."""
    out = []
    for layer in cache.layers:
        if layer.is_initialized:
            out.append([t.clone() for t in (*layer.state, layer.row_seen)] + [layer.seen])
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for la, lb in zip(a, b):
        assert la[-1] == lb[-1]
        for x, y in zip(la[:-1], lb[:-1]):
            assert torch.equal(x, y)


# -- constructor -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=True), r"budget must be an int >= 1, got budget=True"),
    (dict(budget=16.0), r"budget must be an int >= 1, got budget=16.0"),
    (dict(budget="16"), r"budget must be an int >= 1, got budget='16'"),
    (dict(budget=-5), r"budget must be an int >= 1, got budget=-5"),
    (dict(budget=16, sinks=True), r"sinks must be an int >= 0, got sinks=True"),
    (dict(budget=16, sinks=2.0), r"sinks must be an int >= 0, got sinks=2.0"),
    (dict(budget=16, recent=-1), r"recent must be an int >= 0, got recent=-1"),
    (dict(budget=16, recent=3.5), r"recent must be an int >= 0, got recent=3.5"),
    (dict(budget=16, chunk_size=True), r"chunk_size must be an int >= 1, got chunk_size=True"),
    (dict(budget=16, chunk_size=None), r"chunk_size must be an int >= 1, got chunk_size=None"),
    (dict(budget=16, cam_window=-2), r"cam_window must be an int >= 1, got cam_window=-2"),
    (dict(budget=16, seed=True), r"seed must be an int, got seed=True"),
    (dict(budget=16, seed="0"), r"seed must be an int, got seed='0'"),
    (dict(budget=16, policy=None), r"policy must be one of .*got policy=None"),
    (dict(budget=16, policy="WeightedKV"), r"policy must be one of .*got policy='WeightedKV'"),
    (dict(budget=16, policy=["evict"]), r"policy must be one of .*got policy=\['evict'\]"),
    (dict(budget=16, group_reduce=None), r"group_reduce must be one of .*got group_reduce=None"),
    (dict(budget=4, sinks=4, recent=0), r"budget must exceed sinks \+ recent, got budget=4, "
                                        r"sinks=4, recent=0"),
    (dict(budget=None, policy="full", recent=-1), r"recent must be an int >= 0, got recent=-1"),
])
def test_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match="WeightedKVCache: " + match):
        WeightedKVCache(**kwargs)


@pytest.mark.parametrize("name", ["budget", "seed", "cam_window", "chunk_size"])
def test_constructor_rejects_ints_beyond_int64(name):
    kwargs = dict(budget=16, sinks=1, recent=1)
    kwargs[name] = 2 ** 64 + (16 if name == "budget" else 0)
    with pytest.raises(ValueError, match=f"WeightedKVCache: {name} "):
        WeightedKVCache(**kwargs)


# -- the cache used by the wrong model / batch -----------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def fed_cache(model, batch=1):
    cache = WeightedKVCache(budget=8, sinks=1, recent=2, chunk_size=4)
    with torch.no_grad():
        model(ids(12, batch), past_key_values=cache)
    return cache


@pytest.mark.parametrize("other, match", [
    (dict(batch=2), r"layer 0 holds batch=1, kv_heads=2, head_dim=8, got key_states "
                    r"\(2, 2, 5, 8\)"),
    (dict(kv_heads=4), r"layer 0 holds batch=1, kv_heads=2, head_dim=8, got key_states "
                       r"\(1, 4, 5, 8\)"),
    (dict(head_dim=16), r"layer 0 holds batch=1, kv_heads=2, head_dim=8, got key_states "
                        r"\(1, 2, 5, 16\)"),
    (dict(dtype=torch.bfloat16), r"layer 0 holds torch.float32 on cpu, got key_states "
                                 r"torch.bfloat16 on cpu"),
], ids=["batch", "kv_heads", "head_dim", "dtype"])
def test_cache_refuses_another_batch_or_model_shape(model, other, match):
    """The error comes before anything is written; the cache then continues with its own model
    exactly like a cache that never saw the bad call."""
    cache, clean = fed_cache(model), fed_cache(model)
    batch = other.pop("batch", 1)
    wrong = tiny_llama(**other) if other else model
    before = snapshot(cache)
    with pytest.raises(ValueError, match="WeightedKVCache: " + match), torch.no_grad():
        wrong(ids(5, batch, seed=1), past_key_values=cache)
    assert_same(snapshot(cache), before)
    with torch.no_grad():
        got = model(ids(6, seed=2), past_key_values=cache).logits
        want = model(ids(6, seed=2), past_key_values=clean).logits
    assert torch.equal(got, want)
    assert_same(snapshot(cache), snapshot(clean))


@pytest.mark.parametrize("layers", [1, 3])
def test_cache_refuses_a_model_with_another_number_of_layers(model, layers):
    """A 3-layer model on the 2-layer cache is caught at its new layer 2; a 1-layer model cannot
    be told apart from a 2-layer one until the 2-layer model comes back (layer 1 fell behind).
    The error names the layer and suggests reset(), after which the cache works again."""
    cache = fed_cache(model)
    bad_layer = 2 if layers == 3 else 1
    with torch.no_grad(), pytest.raises(
            (ValueError, RuntimeError),
            match=rf"WeightedKVCache: layer {bad_layer} .*another number of layers.*reset\(\)"):
        tiny_llama(layers=layers)(ids(5, seed=1), past_key_values=cache)
        model(ids(5, seed=2), past_key_values=cache)  # at the latest here
    cache.reset()
    with torch.no_grad():
        got = model(ids(6, seed=2), past_key_values=cache).logits
        want = model(ids(6, seed=2), past_key_values=WeightedKVCache(8, 1, 2, chunk_size=4)).logits
    assert torch.equal(got, want)


def test_reset_allows_another_batch_and_model(model):
    cache = fed_cache(model)
    cache.reset()
    other = tiny_llama(kv_heads=4, head_dim=16)
    with torch.no_grad():
        out = other(ids(9, 3), past_key_values=cache).logits
    assert out.shape == (3, 9, 128)
    assert cache.held_tokens().shape == (2, 3, 4)


@pytest.mark.parametrize("bad", [None, "llama", torch.nn.Linear(2, 2)],
                         ids=["None", "str", "module"])
def test_enable_rejects_a_non_model(bad):
    with pytest.raises(TypeError, match="enable: model must be a transformers PreTrainedModel"):
        weightedkv_ext.enable(bad)


# -- the attention function called with inconsistent tensors ----------------------------------------

def attention_call(cache, q, k, v, real=None):
    """What a model layer does: cache.update(), then the registered attention function."""
    k, v = cache.update(k, v, 0)
    mask = None if real is None else WeightedKVMask(real, None)
    return weightedkv_attention_forward(None, q, k, v, mask, scaling=0.3)[0]


BAD_ATTENTION_INPUTS = {
    "query heads": r"the number of query heads must be a positive multiple of the 2 KV heads .*"
                   r"got query \(2, 3, 5, 8\)",
    "query head_dim": r"query head_dim must be 8 .*got query \(2, 4, 5, 4\)",
    "query length": r"query must have 5 tokens .*got query \(2, 4, 4, 8\)",
    "query dtype": r"query must be torch.float32 on cpu like the keys, got torch.float64 on cpu",
    "mask shape": r"padding mask has shape \(2, 4\), expected \[2, 5\]",
}


@pytest.mark.parametrize("bad", list(BAD_ATTENTION_INPUTS))
def test_attention_rejects_inconsistent_inputs_before_touching_the_cache(bad):
    """The error names the argument; the cache is exactly as before the call (seen rolled back,
    nothing appended, not pending) and keeps working like a cache that never saw the call."""
    caches = [WeightedKVCache(8, sinks=1, recent=2, chunk_size=3) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    kv = [torch.randn(2, 2, 5, 8, generator=g) for _ in range(2)]
    q0 = torch.randn(2, 4, 5, 8, generator=g)
    for cache in caches:
        attention_call(cache, q0, *kv)
    cache, clean = caches
    before, seq = snapshot(cache), cache.get_seq_length()
    q, real = torch.randn(2, 4, 5, 8, generator=g), None
    if bad == "query heads":
        q = torch.randn(2, 3, 5, 8)
    elif bad == "query head_dim":
        q = torch.randn(2, 4, 5, 4)
    elif bad == "query length":
        q = torch.randn(2, 4, 4, 8)
    elif bad == "query dtype":
        q = q.double()
    else:
        real = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="weightedkv attention: " + BAD_ATTENTION_INPUTS[bad]):
        attention_call(cache, q, *kv, real)
    assert_same(snapshot(cache), before)
    assert cache.get_seq_length() == seq
    assert not cache.layers[0].pending
    q = torch.randn(2, 4, 5, 8, generator=g)
    assert torch.equal(attention_call(cache, q, *kv), attention_call(clean, q, *kv))
    assert_same(snapshot(cache), snapshot(clean))
