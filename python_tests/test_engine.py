"""KVEngine (the transformers-free door) and the integration defects of issue #10: imports and
registration, huge budgets, failed calls leave no trace, inference/no_grad/plain modes, grad,
autocast, masked cached tokens, refused keywords, integer-like arguments, the policy registry."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

weightedkv_ext = pytest.importorskip("weightedkv_ext",
                                     reason="weightedkv_ext is not built (bash scripts/build.sh)")
from weightedkv_ext import policies, reference  # noqa: E402
from weightedkv_ext.engine import KVEngine  # noqa: E402

from test_fuzz_ops import fuzz_settings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


def qkv(B=2, Hq=4, H=2, T=5, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, T, D, generator=g).to(dtype),
            torch.randn(B, H, T, D, generator=g).to(dtype),
            torch.randn(B, H, T, D, generator=g).to(dtype))


def snapshot(engine):
    return ([None if t is None else t.clone() for t in (*engine.state, engine.row_seen)],
            engine.seen, engine.capacity)


def assert_snapshot(engine, snap):
    tensors, seen, capacity = snap
    assert engine.seen == seen and engine.capacity == capacity
    for got, want in zip((*engine.state, engine.row_seen), tensors):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)


# -- imports -------------------------------------------------------------------------------------

def test_engine_works_where_transformers_cannot_be_imported():
    r = _python("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ImportError("transformers is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        import weightedkv_ext
        from weightedkv_ext import KVEngine
        e = KVEngine(budget=8, sinks=1, recent=2, chunk_size=4)
        q, k, v = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
        out = e.attend(q, k, v)
        assert out.shape == (1, 4, 20, 8) and e.held_tokens().eq(8).all()
        assert not any(m.startswith("transformers") for m in sys.modules), "imported"
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_import_registers_the_attention_for_from_pretrained():
    r = _python("""
        import weightedkv_ext
        import sys
        assert "transformers" not in sys.modules  # registration does not import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="weightedkv")
        assert model.config._attn_implementation == "weightedkv"
        import torch
        cache = weightedkv_ext.WeightedKVCache(budget=8, sinks=1, recent=2)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]), **cache.as_kwargs())
        assert cache.held_tokens().eq(3).all()
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_policy_registry_agrees_with_the_reference_and_the_ops():
    assert policies.KERNEL_POLICIES == reference.POLICIES == weightedkv_ext.ops.POLICIES
    assert policies.GROUP_REDUCES == reference.GROUP_REDUCES
    assert set(policies.POLICIES) == set(policies.KERNEL_POLICIES) | {"full"}
    assert all(p.paper and p.display and p.removes for p in policies.TABLE)
    assert KVEngine(256).recent == policies.default_recent(256, 4) == 124
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert policies.markdown_table() in f.read()  # the README's table is the registry's


# -- storage -------------------------------------------------------------------------------------

def test_huge_budget_grows_with_the_tokens_held():
    big, small = KVEngine(budget=10 ** 9, chunk_size=16), KVEngine(budget=64, chunk_size=16)
    for step in range(3):
        q, k, v = qkv(T=30 if step == 0 else 1, seed=step)
        assert torch.equal(big.attend(q, k, v), small.attend(q, k, v))
    assert big.capacity <= 64  # 32 tokens held: 32 slots (doubling), not 10**9
    assert big.memory_bytes() < 100_000 and big.held_tokens().eq(32).all()


def test_huge_budget_cache_allocates_only_what_it_holds():
    model = tiny_llama().requires_grad_(False)
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    huge = weightedkv_ext.WeightedKVCache(budget=10 ** 9, chunk_size=np.int64(128))
    with torch.no_grad():
        got = model(ids, **huge.as_kwargs()).logits
        want = model(ids, **weightedkv_ext.WeightedKVCache(budget=64).as_kwargs()).logits
    assert torch.equal(got, want)
    assert huge.memory_bytes() < 2 ** 20 and huge.held_tokens().eq(30).all()


def test_integer_like_arguments_are_accepted():
    e = KVEngine(budget=np.int64(16), sinks=np.int32(2), chunk_size=np.int64(4))
    assert (e.budget, e.sinks, e.recent, e.chunk_size) == (16, 2, 6, 4)
    assert type(e.budget) is int
    with pytest.raises(ValueError, match=r"KVEngine: budget must be an int >= 1, got budget=True"):
        KVEngine(budget=True)


# -- failed calls ----------------------------------------------------------------------------------

STAGES = ["grow", "append", "block_attention", "decode_attention", "compress", "compress#2"]


class Boom(Exception):
    pass


def inject_failure(engine, stage, monkeypatch) -> None:
    """Make ``engine`` raise Boom at ``stage``: an op name or ``grow`` (slot growth), ``#n`` for
    its n-th call within the next attend."""
    op_name, _, nth = stage.partition("#")
    calls = {"n": 0}

    def failing(real):
        def f(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == int(nth or 1):
                raise Boom(stage)
            return real(*args, **kwargs)
        return f

    if op_name == "grow":
        monkeypatch.setattr(engine, "_make_room", failing(engine._make_room))
        return

    class Ops:  # the engine's op module with one op failing
        pass
    ops = Ops()
    for name in ("append", "block_attention", "compress", "decode_attention"):
        setattr(ops, name, getattr(engine.ops, name))
    setattr(ops, op_name, failing(getattr(engine.ops, op_name)))
    monkeypatch.setattr(engine, "ops", ops)


@pytest.mark.parametrize("chunk_size", [8, 4])
@pytest.mark.parametrize("stage", STAGES)
def test_any_failure_leaves_the_engine_exactly_as_before(stage, chunk_size, monkeypatch):
    """A failure injected at each stage of a call (the second chunk's compress for
    ``compress#2``) raises, leaves the engine bit for bit as before, and the engine then
    continues exactly like one that never saw the call. Chunk 8: the call grows the storage
    first; chunk 4: its first chunk writes the old storage in place, a later one grows it."""
    engine, clean = (KVEngine(budget=40, sinks=1, recent=4, chunk_size=chunk_size)
                     for _ in range(2))
    for e in (engine, clean):
        e.attend(*qkv(T=12, seed=1))  # 12 tokens held in 16 slots
    snap = snapshot(engine)
    op_name = stage.partition("#")[0]
    inject_failure(engine, stage, monkeypatch)
    T = 1 if op_name == "decode_attention" else 40  # 40 tokens: 5 chunks, growth, compress
    with pytest.raises(Boom):
        engine.attend(*qkv(T=T, seed=2))
    assert_snapshot(engine, snap)
    monkeypatch.undo()
    for seed, T in ((2, T), (3, 1)):
        assert torch.equal(engine.attend(*qkv(T=T, seed=seed)), clean.attend(*qkv(T=T, seed=seed)))
    assert_snapshot(engine, snapshot(clean))


@pytest.mark.parametrize("stage", ["grow", "append", "append#2", "block_attention#2",
                                   "decode_attention"])
def test_full_cache_failure_restores_without_copying_its_tokens(stage, monkeypatch):
    """The full cache never compresses, so its snapshot copies the statistics and positions but
    not the keys and values (a decode step would otherwise copy the whole cache): a failure after
    some chunks were appended (``append#2``: the second chunk's) still leaves the engine bit for
    bit as before, and it continues like one that never saw the call."""
    engine, clean = (KVEngine(budget=None, policy="full", chunk_size=4) for _ in range(2))
    for e in (engine, clean):
        e.attend(*qkv(T=12, seed=1))  # 16 slots: the next call's first chunk fills them in place
    snap = snapshot(engine)
    copied = []
    real_clone = torch.Tensor.clone

    def spy_clone(t, *a, **kw):
        copied.append(t.shape)
        return real_clone(t, *a, **kw)

    op_name = stage.partition("#")[0]
    inject_failure(engine, stage, monkeypatch)
    monkeypatch.setattr(torch.Tensor, "clone", spy_clone)
    T = 1 if op_name == "decode_attention" else 40
    with pytest.raises(Boom):
        engine.attend(*qkv(T=T, seed=2))
    assert tuple(engine.keys.shape) not in [tuple(s) for s in copied]  # no copy of the tokens
    assert_snapshot(engine, snap)
    monkeypatch.undo()
    for seed, T in ((2, T), (3, 1)):
        assert torch.equal(engine.attend(*qkv(T=T, seed=seed)), clean.attend(*qkv(T=T, seed=seed)))
    assert_snapshot(engine, snapshot(clean))


@pytest.mark.parametrize("policy", ["full", "weightedkv"])
def test_failure_after_leaving_inference_mode_restores(policy, monkeypatch):
    """A cache filled under inference_mode, then called outside it (its tensors are copied as
    normal ones first), fails in its second chunk: the original error is raised (restoring does
    not try to write the inference tensors) and the engine continues like a clean one."""
    kw = dict(budget=None) if policy == "full" else dict(budget=40, sinks=1, recent=4)
    engine, clean = (KVEngine(policy=policy, chunk_size=4, **kw) for _ in range(2))
    with torch.inference_mode():
        for e in (engine, clean):
            e.attend(*qkv(T=12, seed=1))
    inject_failure(engine, "append#2", monkeypatch)
    with pytest.raises(Boom):
        engine.attend(*qkv(T=12, seed=2))
    monkeypatch.undo()
    for seed, T in ((2, 12), (3, 1)):
        assert torch.equal(engine.attend(*qkv(T=T, seed=seed)), clean.attend(*qkv(T=T, seed=seed)))
    assert_snapshot(engine, snapshot(clean))


@fuzz_settings(200)
@given(data=st.data())
def test_fuzz_any_failure_restores_exactly(data):
    """Random engines (every policy, budgets, chunk sizes, sliding windows, snapkv prompts held or
    ended, filled in or out of inference mode) and a failure at a random op call of the next
    call: the engine is bit for bit as before and continues like one that never saw the call."""
    draw = data.draw
    policy = draw(st.sampled_from(list(policies.POLICIES)), label="policy")
    kw = dict(policy=policy, chunk_size=draw(st.sampled_from([1, 2, 3, 4, 8]), label="chunk"),
              window=draw(st.sampled_from([0, 0, 6]), label="window"))
    if policy == "full":
        kw["budget"] = None
    else:
        kw["budget"] = draw(st.sampled_from([8, 12, 20]), label="budget")
        kw["sinks"] = draw(st.integers(0, 2), label="sinks")
        kw["recent"] = draw(st.integers(0, 4), label="recent")
        if draw(st.booleans(), label="snapkv"):
            kw.update(prompt_mode="snapkv", prompt_end="manual", prompt_window=4)
    engine, clean = KVEngine(**kw), KVEngine(**kw)
    seed, T0 = draw(st.integers(0, 99), label="seed"), draw(st.sampled_from([1, 5, 12, 30]))
    with torch.inference_mode(draw(st.booleans(), label="filled in inference mode")):
        for e in (engine, clean):
            e.attend(*qkv(T=T0, seed=seed))
    if kw.get("prompt_mode") and draw(st.booleans(), label="prompt ended"):
        for e in (engine, clean):
            e.end_prompt()
    snap = snapshot(engine)
    op = draw(st.sampled_from(["grow", "append", "block_attention", "decode_attention",
                               "compress"]), label="op")
    stage = f"{op}#{draw(st.integers(1, 3), label='nth call')}"
    T = 1 if op == "decode_attention" else draw(st.sampled_from([3, 9, 17, 40]), label="T")
    with pytest.MonkeyPatch.context() as mp:
        inject_failure(engine, stage, mp)
        try:
            engine.attend(*qkv(T=T, seed=seed + 1))
            failed = False
        except Boom:
            failed = True
    if failed:
        assert_snapshot(engine, snap)
    else:  # the op was called fewer times than nth: the call went through
        clean.attend(*qkv(T=T, seed=seed + 1))
    for sd, t in ((seed + 1, T), (seed + 2, 1)):
        assert torch.equal(engine.attend(*qkv(T=t, seed=sd)), clean.attend(*qkv(T=t, seed=sd)))
    assert_snapshot(engine, snapshot(clean))


def test_prompt_held_under_inference_mode_ends_outside_it():
    """A snapkv prompt prefilled under torch.inference_mode() and ended outside it (e.g. a
    manual end_prompt() after the prefill block) compresses like one run in a single mode."""
    kw = dict(budget=12, sinks=1, recent=2, chunk_size=4, prompt_mode="snapkv", prompt_window=4,
              prompt_end="manual")
    engine, clean = KVEngine(**kw), KVEngine(**kw)
    with torch.inference_mode():
        engine.attend(*qkv(T=30, seed=1))
    clean.attend(*qkv(T=30, seed=1))
    engine.end_prompt()
    clean.end_prompt()
    assert_snapshot(engine, snapshot(clean))
    assert torch.equal(engine.attend(*qkv(T=1, seed=2)), clean.attend(*qkv(T=1, seed=2)))


@pytest.mark.parametrize("bad", ["value dtype", "value device", "kv heads", "value head_dim",
                                 "positions", "sink_logits"])
def test_every_argument_is_checked_before_anything_is_written(bad):
    engine = KVEngine(budget=8, sinks=1, recent=2, chunk_size=4)
    engine.attend(*qkv(T=6))
    snap = snapshot(engine)
    q, k, v = qkv(T=3, seed=5)
    kw = {}
    if bad == "value dtype":
        v, match = v.to(torch.bfloat16), r"key and value must share dtype and device"
    elif bad == "value device":
        v, match = v.to("meta"), r"key and value must share dtype and device"
    elif bad == "kv heads":
        q, k, v = qkv(Hq=4, H=4, T=3)
        match = r"KVEngine holds batch=2, kv_heads=2, head_dim=8, got key \(2, 4, 3, 8\): " \
                r"another number of KV heads"
    elif bad == "value head_dim":
        v, match = torch.randn(2, 2, 3, 4), r"value head_dim \(4\) differs from the key head_dim"
    elif bad == "positions":
        kw, match = dict(positions=torch.zeros(2, 3)), r"positions must be an int64 tensor"
    else:
        kw, match = dict(sink_logits=torch.zeros(3)), r"sink_logits \(s_aux\) must be a tensor"
    with pytest.raises(ValueError, match=match):
        engine.attend(q, k, v, **kw)
    assert_snapshot(engine, snap)


# -- modes ----------------------------------------------------------------------------------------

def tiny_llama(**kw):
    from test_validation_cache import tiny_llama as make
    return make(**kw)


MODES = {"inference": torch.inference_mode, "no_grad": torch.no_grad,
         "plain": torch.enable_grad}


@pytest.mark.parametrize("order", [("inference", "no_grad", "plain"),
                                   ("plain", "inference", "no_grad"),
                                   ("no_grad", "plain", "inference")])
def test_every_mode_sequence_works(order):
    model = tiny_llama().requires_grad_(False)
    cache, ref_cache = (weightedkv_ext.WeightedKVCache(16, sinks=1, recent=4, chunk_size=4)
                        for _ in range(2))
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    for i, mode in enumerate(order):
        part = ids[:, i * 10:(i + 1) * 10]
        with MODES[mode]():
            got = model(part, **cache.as_kwargs()).logits
        with torch.no_grad():
            want = model(part, **ref_cache.as_kwargs()).logits
        assert torch.equal(got, want), mode


def test_grad_is_refused_before_anything_changes():
    model = tiny_llama()  # parameters require grad
    cache = weightedkv_ext.WeightedKVCache(16, sinks=1, recent=4, chunk_size=4)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), **cache.as_kwargs())
    before = [t.clone() for t in cache.layers[0].state]
    with pytest.raises(RuntimeError, match=r"weightedkv attention: weightedkv is inference only"
                                           r".*torch.no_grad\(\)"):
        model(torch.tensor([[8]]), **cache.as_kwargs())
    assert cache.get_seq_length() == 3
    assert all(torch.equal(a, b) for a, b in zip(cache.layers[0].state, before))


def test_autocast_computes_in_the_autocast_dtype_like_sdpa():
    from transformers import DynamicCache
    model = tiny_llama().requires_grad_(False)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    cache = weightedkv_ext.WeightedKVCache(64, chunk_size=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids, **cache.as_kwargs()).logits
        model.set_attn_implementation("sdpa")
        want = model(ids, past_key_values=DynamicCache(config=model.config)).logits
    assert cache.layers[0].keys.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


# -- masks and keywords ---------------------------------------------------------------------------

def test_masking_out_a_cached_token_is_refused():
    model = tiny_llama().requires_grad_(False)
    cache = weightedkv_ext.WeightedKVCache(64, chunk_size=4)
    ids = torch.randint(3, 128, (1, 8))
    first = torch.tensor([[0, 1, 1, 1, 1, 1]])  # column 0: left padding
    with torch.no_grad():
        model(ids[:, :6], attention_mask=first, **cache.as_kwargs())
        for col, match in ((2, r"marks cached column 2 of row 0 as padding, but it was cached "
                                r"as real"),
                           (0, r"marks cached column 0 of row 0 as real, but it was cached as "
                               r"padding")):
            mask = torch.cat([first, torch.ones(1, 1, dtype=torch.long)], 1)
            mask[0, col] = 1 - mask[0, col]
            if col == 0:
                mask[0, 3] = 0  # the same number of real columns, swapped
            with pytest.raises(ValueError, match="weightedkv attention: the attention_mask " +
                                                 match):
                model(ids[:, 6:7], attention_mask=mask, **cache.as_kwargs())
        # padding recorded as padding is fine, and the cache is intact
        model(ids[:, 6:7], attention_mask=torch.cat([first, torch.ones(1, 1).long()], 1),
              **cache.as_kwargs())
    assert cache.get_seq_length() == 7 and cache.layers[0].row_seen.tolist() == [6]


def test_output_attentions_and_unknown_keywords_are_refused():
    from weightedkv_ext.attention import weightedkv_attention_forward
    model = tiny_llama().requires_grad_(False)
    cache = weightedkv_ext.WeightedKVCache(64, chunk_size=4)
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions=True is not "
                                                          "supported"):
        model(torch.tensor([[4, 5]]), output_attentions=True, **cache.as_kwargs())
    q, k, v = qkv(T=2)
    k, v = cache.update(k, v, 0)
    with pytest.raises(TypeError, match=r"attention keyword alibi_slopes=<tensor \(4,\)>"):
        weightedkv_attention_forward(None, q, k, v, None, alibi_slopes=torch.zeros(4))
    assert not cache.layers[0].pending and cache.get_seq_length() == 0


def test_engine_and_cache_deep_copy_and_pickle_mid_stream():
    import copy
    import pickle
    engine = KVEngine(budget=8, sinks=1, recent=2, chunk_size=4)
    engine.attend(*qkv(T=11))
    model = tiny_llama().requires_grad_(False)
    cache = weightedkv_ext.WeightedKVCache(8, sinks=1, recent=2, chunk_size=4)
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 11)), **cache.as_kwargs())
    nxt = torch.tensor([[7]])
    for make in (copy.deepcopy, lambda x: pickle.loads(pickle.dumps(x))):
        e = make(engine)
        assert torch.equal(e.attend(*qkv(T=3, seed=9)), engine.attend(*qkv(T=3, seed=9)))
        c = make(cache)
        with torch.no_grad():
            assert torch.equal(model(nxt, **c.as_kwargs()).logits,
                               model(nxt, **copy.deepcopy(cache).as_kwargs()).logits)


@pytest.mark.parametrize("prompt_mode", ["stream", "snapkv"])
def test_dropped_cache_is_freed_without_the_cyclic_gc(prompt_mode):
    """A cache must not be a reference cycle: one cache per request (or per eval cell) would hold
    its storage until the cyclic GC ran (the retrieval eval grew to 5 GB per process)."""
    import gc
    import weakref
    model = tiny_llama().requires_grad_(False)
    gc.collect()
    gc.disable()
    try:
        cache = weightedkv_ext.WeightedKVCache(8, sinks=1, recent=2, chunk_size=4,
                                               prompt_mode=prompt_mode, prompt_window=4)
        with torch.no_grad():
            model(torch.randint(3, 128, (1, 11)), **cache.as_kwargs())
            model(torch.tensor([[7]]), **cache.as_kwargs())
        alive = weakref.ref(cache)
        engine = weakref.ref(cache.layers[0].engine)
        del cache
        assert alive() is None and engine() is None
    finally:
        gc.enable()



def test_engine_defaults_are_one_table():
    """policies.OPTIONS and MERGE_RULE_DEFAULT are the engine's defaults: KVEngine,
    WeightedKVCache and the harness's CacheOptions read them. At the op level the registered
    schemas (csrc/torch_bindings.cpp) carry the defaults; the Python wrappers, their fake
    (meta) kernels and reference.py's deliberate copy must equal them, and them the table."""
    import dataclasses
    import inspect

    from helpers import OPS
    from weightedkv_ext import ops
    from weightedkv_ext.eval.caches import CacheOptions

    want = {**policies.OPTIONS, **policies.MERGE_RULE_DEFAULT}
    for fn in (KVEngine.__init__, weightedkv_ext.WeightedKVCache.__init__):
        sig = inspect.signature(fn).parameters
        assert {k: sig[k].default for k in want} == want, fn.__qualname__
    fields = {f.name: f.default for f in dataclasses.fields(CacheOptions)}
    # chunk_size is a required field of CacheOptions (every run names it)
    harness = {k: v for k, v in policies.OPTIONS.items() if k != "chunk_size"}
    assert {k: fields[k] for k in harness} == harness
    assert CacheOptions(chunk_size=1).merge_rule == policies.MERGE_RULE_DEFAULT
    for name in OPS:
        schema = {a.name: a.default_value
                  for a in getattr(torch.ops.weightedkv, name).default._schema.arguments
                  if a.has_default_value()}
        for k in set(schema) & set(want):
            assert schema[k] == want[k], (name, k)
        for fn in (getattr(ops, name), getattr(ops, f"_{name}_fake"), getattr(reference, name)):
            sig = inspect.signature(fn).parameters
            assert {k: sig[k].default for k in schema if k in sig} == schema, \
                (fn.__module__, fn.__name__)
