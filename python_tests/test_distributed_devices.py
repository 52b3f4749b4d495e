"""Multi-device models (``device_map``: layers on different devices) with a WeightedKVCache.

Each cache layer allocates its slots on the device of the keys it receives and never moves them;
``held_tokens()``, ``memory_bytes()``, ``reset()``, beam reordering and the batch ops keep every
layer on its device.

On CPU only: layer 1 (and the head) live on the ``meta`` device, layer 0 on ``cpu`` (a forward
pre-hook moves the inputs, as accelerate's device_map hooks do). The ops' meta kernels check that
all their tensors share one device, and the cache checks the keys' device, so any state put on
another layer's device fails the run. Data-dependent steps (padding, the ``full`` policy's growth,
``held_tokens()``) cannot run on ``meta``; they are covered on real devices by
``test_device_map_generate_matches_one_device`` (GPUs: ``cuda:0`` + ``cuda:1``, or ``cpu`` +
``cuda:0`` with one GPU; scripts/gpu_multi.sh).
"""
from __future__ import annotations

import pytest
import torch

weightedkv_ext = pytest.importorskip(
    "weightedkv_ext", reason="weightedkv_ext is not built (bash scripts/build.sh)")
from transformers.cache_utils import Cache  # noqa: E402

from weightedkv_ext import WeightedKVCache  # noqa: E402

import tp_worker  # noqa: E402  (the tiny Llama and prompts shared with the TP test)

CACHE = dict(budget=16, sinks=2, recent=4, chunk_size=8)
# On meta: budget <= chunk_size, so that an engine growing its slots with the tokens held
# (amortised doubling, a data-dependent size) reaches budget + chunk_size at its first allocation.
META_CACHE = dict(budget=8, sinks=2, recent=2, chunk_size=8)
COMPRESSING = [p for p in weightedkv_ext.POLICIES if p != "full"]


def _move(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_move(y, device) for y in x)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


def place(model, device: str, modules):
    """Put ``modules`` of ``model`` on ``device`` with a hook moving their inputs there."""
    for mod in modules:
        mod.to(device)
        mod.register_forward_pre_hook(
            lambda m, args, kwargs: (_move(args, device), _move(kwargs, device)), with_kwargs=True)
    return model


def state_tensors(obj, prefix="", depth=0):
    """Every tensor a cache layer holds: its attributes, and those of the weightedkv_ext objects
    it owns (whatever the layer's internals are called), not following references to the cache."""
    for name, v in vars(obj).items():
        path = f"{prefix}{name}"
        if isinstance(v, torch.Tensor):
            yield path, v
        elif isinstance(v, (list, tuple)):
            for i, t in enumerate(v):
                if isinstance(t, torch.Tensor):
                    yield f"{path}[{i}]", t
        elif (depth < 2 and hasattr(v, "__dict__") and not isinstance(v, (Cache, type))
              and type(v).__module__.startswith("weightedkv_ext")):
            yield from state_tensors(v, f"{path}.", depth + 1)


def assert_on(cache, devices):
    assert len(cache.layers) == len(devices)
    for i, (layer, dev) in enumerate(zip(cache.layers, devices)):
        tensors = list(state_tensors(layer))
        assert tensors, f"layer {i} holds no tensor"
        for path, t in tensors:
            assert t.device.type == dev, f"layer {i}.{path} is on {t.device}, expected {dev}"


def split_model(name="gqa"):
    """Layer 0 (and the embeddings) on cpu; layer 1, the final norm and lm_head on meta."""
    model = weightedkv_ext.enable(tp_worker.tiny_llama(name))
    return place(model, "meta", [model.model.layers[1], model.model.norm, model.lm_head])


@torch.no_grad()
def run(model, cache, ids, decode_steps=3):
    model(ids, **cache.as_kwargs())
    for _ in range(decode_steps):
        model(ids[:, :1], **cache.as_kwargs())


@pytest.fixture
def meta_without_autocast(monkeypatch):
    """torch.is_autocast_enabled("meta") raises instead of returning False (meta has no
    autocast); answer False for meta so that an autocast-aware cache can run a meta layer."""
    enabled = torch.is_autocast_enabled

    def is_enabled(*args):
        if args and (args[0] == "meta" or getattr(args[0], "type", None) == "meta"):
            return False
        return enabled(*args)
    monkeypatch.setattr(torch, "is_autocast_enabled", is_enabled)


@pytest.mark.parametrize("policy", COMPRESSING)
@pytest.mark.parametrize("name", list(tp_worker.CONFIGS))
def test_each_layer_keeps_its_state_on_its_device(one_thread, meta_without_autocast, name, policy):
    ids, _ = tp_worker.prompts(False, "cpu")
    model = split_model(name)
    cache = WeightedKVCache(policy=policy, **META_CACHE)
    run(model, cache, ids)  # prefill in 5 chunks, 3 decode steps; compression throughout
    assert_on(cache, ["cpu", "meta"])

    # The cpu layer is exactly what an all-cpu model computes (layer 0 does not see layer 1).
    one = WeightedKVCache(policy=policy, **META_CACHE)
    run(weightedkv_ext.enable(tp_worker.tiny_llama(name)), one, ids)
    for (path, a), (_, b) in zip(state_tensors(cache.layers[0]), state_tensors(one.layers[0])):
        assert torch.equal(a, b), path
    assert cache.memory_bytes() == one.memory_bytes()

    # Beam reordering and the batch ops (index tensors on cpu, as generate() passes them).
    cache.reorder_cache(torch.tensor([1, 0]))
    assert_on(cache, ["cpu", "meta"])
    cache.batch_repeat_interleave(2)
    assert_on(cache, ["cpu", "meta"])
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert_on(cache, ["cpu", "meta"])
    with torch.no_grad():
        model(ids[:, :1], **cache.as_kwargs())  # still usable on both devices
    assert_on(cache, ["cpu", "meta"])
    assert cache.memory_bytes() == one.memory_bytes()

    cache.reset()
    assert cache.memory_bytes() == 0
    run(model, cache, ids, decode_steps=1)
    assert_on(cache, ["cpu", "meta"])


def _gpu_device_pairs():
    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    return [("cuda:0", "cuda:1")] if n >= 2 else [("cpu", "cuda:0")]


def _cuda_kernels() -> bool:
    from weightedkv_ext import _loader
    return _loader.cuda_built()


@pytest.mark.skipif(not _gpu_device_pairs(), reason="needs a CUDA device (scripts/gpu_multi.sh)")
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("policy", list(weightedkv_ext.POLICIES))
def test_device_map_generate_matches_one_device(tmp_path, policy, padded):
    """transformers' device_map puts layer 0 and layer 1 on two devices; greedy and beam-search
    generate() equal the run with the whole model on the second device, each layer's slots stay
    on its device, and held_tokens()/memory_bytes() match."""
    if not _cuda_kernels():
        pytest.skip("weightedkv_ext was built without the CUDA kernels (scripts/gpu_check.sh)")
    from transformers import AutoModelForCausalLM
    first, second = _gpu_device_pairs()[0]
    folder = tmp_path / "gqa"
    tp_worker.tiny_llama("gqa").save_pretrained(folder)
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first,
                  "model.layers.0": first, "model.layers.1": second,
                  "model.norm": second, "lm_head": second}
    split = weightedkv_ext.enable(AutoModelForCausalLM.from_pretrained(
        folder, device_map=device_map, dtype=torch.float32).eval())
    whole = weightedkv_ext.enable(AutoModelForCausalLM.from_pretrained(
        folder, device_map={"": second}, dtype=torch.float32).eval())
    ids, mask = tp_worker.prompts(padded, first)
    kw = dict(CACHE, budget=None) if policy == "full" else dict(CACHE)
    for beams in (1, 2):
        caches, outs = [], []
        for model, dev in ((split, first), (whole, second)):
            cache = WeightedKVCache(policy=policy, **kw)
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                     **cache.as_kwargs(), max_new_tokens=8, min_new_tokens=8,
                                     do_sample=False, num_beams=beams,
                                     pad_token_id=tp_worker.PAD)
            caches.append(cache)
            outs.append(out.cpu())
        assert torch.equal(outs[0], outs[1]), f"num_beams={beams}"
        assert_on(caches[0], [torch.device(first).type, torch.device(second).type])
        if first.startswith("cuda") and second.startswith("cuda"):
            for layer, dev in zip(caches[0].layers, (first, second)):
                for path, t in state_tensors(layer):
                    assert t.device == torch.device(dev), path
        assert torch.equal(caches[0].held_tokens(), caches[1].held_tokens())
        if policy != "full":
            assert int(caches[0].held_tokens().max()) <= CACHE["budget"]
        assert caches[0].memory_bytes() == caches[1].memory_bytes()
        assert caches[0].kv_bytes_held() == caches[1].kv_bytes_held()
        caches[0].reset()
        assert caches[0].memory_bytes() == 0
