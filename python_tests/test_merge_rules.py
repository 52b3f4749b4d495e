"""weightedkv's merge-rule options (compress's merge_target / merge_gate / merge_weights and the
merged counter, issue #14): hand-worked traces, compiled ops == reference, the paper's defaults
unchanged, invalid options, and the engine / cache plumbing (state, snapshots, merge_stats).
"""
import pytest
import torch

from helpers import DTYPE_IDS, DTYPES, compiled_ops, layout, random_state, ref, state_copy

from weightedkv_ext import policies
from weightedkv_ext.cache import WeightedKVCache
from weightedkv_ext.engine import KVEngine

TARGETS = ref.MERGE_TARGETS
WEIGHTS = ref.MERGE_WEIGHTS
RULES = [dict(merge_target=t, merge_gate=g, merge_weights=w)
         for t in TARGETS for g in (0.0, 0.25) for w in WEIGHTS]


def _ids(rule):
    return f"{rule['merge_target']}-g{rule['merge_gate']}-{rule['merge_weights']}"


# ---------------------------------------------------------------------------------------------
# a hand-worked 6-token trace (budget 5, no sinks, no recent window: one removal)
#
# position/slot:   0        1        2 (j)     3        4        5
# average score:   1/2      1/4      1/8       3/4      1/2      1/2
# key:           (1, 1)   (0, 1)   (1, 0)    (-1, 0)  (0, -1)  (2, 0)
# cos(k_2, .):   0.7071   0        -         -1       0        1
# j = 2 (lowest average). right -> 3; similar -> 1 (cos 0 > -1); nearest -> 5 (cos 1).
# v_2 = (1, 0), every other v_i = (0, 1).


def six_tokens(merged=None):
    st = ref.new_state(1, 1, 6, 2, torch.float32)
    st.keys[0, 0] = torch.tensor([[1., 1.], [0., 1.], [1., 0.], [-1., 0.], [0., -1.], [2., 0.]])
    st.values[0, 0] = torch.tensor([[0., 1.]] * 6)
    st.values[0, 0, 2] = torch.tensor([1., 0.])
    st.scores[0, 0] = torch.tensor([.5, .25, .125, .75, .5, .5])
    st.counts[0, 0] = 1.0
    st.slot_pos[0, 0] = torch.arange(6)
    m = torch.zeros(1, 1, 6) if merged is None else torch.tensor([[merged]], dtype=torch.float32)
    return st, m


# (rule, target slot, weight of v_2, merged of the target after the merge)
TRACE = [
    (dict(merge_target="right"), 3, (1 / 8) / (1 / 8 + 3 / 4), 1),
    (dict(merge_target="similar"), 1, (1 / 8) / (1 / 8 + 1 / 4), 1),
    (dict(merge_target="nearest"), 5, (1 / 8) / (1 / 8 + 1 / 2), 1),
    (dict(merge_target="right", merge_gate=0.5), None, None, 0),  # cos -1 < 0.5: evicted
    (dict(merge_target="nearest", merge_gate=0.5), 5, (1 / 8) / (1 / 8 + 1 / 2), 1),
    (dict(merge_target="similar", merge_gate=0.5), None, None, 0),  # cos 0 < 0.5
]
# mass weights, with v_2 carrying 1 absorbed token (2 in all) and every other slot 2 (3 in all)
TRACE_MASS = [
    ("right", 3, (2 / 8) / (2 / 8 + 3 * 3 / 4)),
    ("similar", 1, (2 / 8) / (2 / 8 + 3 / 4)),
    ("nearest", 5, (2 / 8) / (2 / 8 + 3 / 2)),
]


@pytest.mark.parametrize("impl", ["reference", "ops"])
@pytest.mark.parametrize("rule,target,w,merged_after", TRACE)
def test_six_token_trace(impl, rule, target, w, merged_after):
    mod = ref if impl == "reference" else compiled_ops()
    st, m = six_tokens()
    mod.compress(*st, 5, 0, 0, "weightedkv", **rule, merged=m)
    assert st.slot_pos[0, 0].tolist() == [0, 1, -1, 3, 4, 5]
    want = torch.tensor([[0., 1.]] * 6)
    want[2] = torch.tensor([1., 0.])
    want_m = torch.zeros(6)
    if target is not None:
        want[target] = torch.tensor([w, 1 - w])
        want_m[target] = merged_after
    torch.testing.assert_close(st.values[0, 0, [0, 1, 3, 4, 5]], want[[0, 1, 3, 4, 5]],
                               rtol=1e-6, atol=1e-7)
    assert m[0, 0].tolist() == want_m.tolist()


@pytest.mark.parametrize("impl", ["reference", "ops"])
@pytest.mark.parametrize("target,slot,w", TRACE_MASS)
def test_six_token_trace_mass(impl, target, slot, w):
    mod = ref if impl == "reference" else compiled_ops()
    st, m = six_tokens(merged=[2., 2., 1., 2., 2., 2.])
    mod.compress(*st, 5, 0, 0, "weightedkv", merge_target=target, merge_weights="mass", merged=m)
    torch.testing.assert_close(st.values[0, 0, slot], torch.tensor([w, 1 - w]), rtol=1e-6,
                               atol=1e-7)
    want_m = [2., 2., 0., 2., 2., 2.]
    want_m[slot] = 2 + 1 + 1  # its own 2, plus j and j's one absorbed token
    assert m[0, 0].tolist() == want_m


# ---------------------------------------------------------------------------------------------
# compiled ops == reference, bit for bit (the float arithmetic of merge.h mirrored literally)


def _random_merged(st, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, 5, st.scores.shape, generator=g).float()
    return torch.where(st.slot_pos >= 0, m, torch.zeros_like(m))


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("budget,sinks,recent", [(17, 2, 3), (9, 1, 2), (4, 0, 0)])
@pytest.mark.parametrize("rule", RULES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rules_match_reference(dtype, rule, budget, sinks, recent, strided):
    """k = 1 and k > 1 removals per call, every target x gate x weighting."""
    ops = compiled_ops()
    B, H, C, D = 2, 3, 20, 7
    base = random_state(B, H, C, D, dtype, held=lambda b, h: 12 + 3 * h + b, seed=11)
    merged = _random_merged(base, 12)
    want, got = state_copy(base), state_copy(base, strided=strided)
    mw, mg = merged.clone(), layout(merged.clone(), strided)
    ref.compress(*want, budget, sinks, recent, "weightedkv", **rule, merged=mw)
    ops.compress(*got, budget, sinks, recent, "weightedkv", **rule, merged=mg)
    for name, g, w in zip(ref.State._fields, got, want):
        assert torch.equal(g, w), f"{name} differs"
    assert torch.equal(mg, mw)


@pytest.mark.parametrize("policy", ref.POLICIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_defaults_unchanged(dtype, policy):
    """The paper's rule (explicit defaults, with or without the merged counter) leaves the cache
    exactly as the call without any option; merged counts weightedkv's merges, zero elsewhere."""
    ops = compiled_ops()
    base = random_state(2, 2, 16, 5, dtype, held=lambda b, h: 10 + 3 * h + b, seed=5)
    plain, explicit = state_copy(base), state_copy(base)
    ops.compress(*plain, 7, 1, 2, policy, 3, 1)
    m = torch.zeros(2, 2, 16)
    ops.compress(*explicit, 7, 1, 2, policy, 3, 1, merge_target="right", merge_gate=0.0,
                 merge_weights="average", merged=m)
    for g, w in zip(explicit, plain):
        assert torch.equal(g, w)
    removed = int((base.slot_pos >= 0).sum() - (plain.slot_pos >= 0).sum())
    if policy == "weightedkv":
        # every removal merges (the right neighbour always exists: recent > 0)
        assert int(m.sum()) == removed and bool((m[plain.slot_pos < 0] == 0).all())
    else:
        assert int(m.abs().sum()) == 0
    rm = torch.zeros(2, 2, 16)
    want = state_copy(base)
    ref.compress(*want, 7, 1, 2, policy, 3, 1, merged=rm)
    assert torch.equal(rm, m)


def test_gate_one_is_evict():
    """merge_gate=1 on random keys merges nothing: the cache equals evict's."""
    ops = compiled_ops()
    base = random_state(1, 2, 16, 6, torch.float32, held=14, seed=9)
    a, b = state_copy(base), state_copy(base)
    ops.compress(*a, 6, 1, 1, "weightedkv", merge_gate=1.0)
    ops.compress(*b, 6, 1, 1, "evict")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# invalid options: clear errors naming the option, nothing written

INVALID = [
    (dict(merge_target="left"), "merge_target"),
    (dict(merge_weights="sum"), "merge_weights"),
    (dict(merge_gate=1.5), "merge_gate"),
    (dict(merge_gate=-0.1), "merge_gate"),
    (dict(merge_gate=float("nan")), "merge_gate"),
    (dict(merge_weights="mass"), "merged"),  # mass needs the counter
]


@pytest.mark.parametrize("impl", ["reference", "ops"])
@pytest.mark.parametrize("kw,needle", INVALID)
def test_invalid_options(impl, kw, needle):
    mod = ref if impl == "reference" else compiled_ops()
    st = random_state(1, 1, 8, 3, torch.float32, held=8, seed=1)
    before = state_copy(st)
    with pytest.raises((RuntimeError, ValueError), match=f"compress: .*{needle}"):
        mod.compress(*st, 5, 1, 1, "weightedkv", **kw)
    for g, w in zip(st, before):
        assert torch.equal(g, w)


@pytest.mark.parametrize("impl", ["reference", "ops"])
@pytest.mark.parametrize("policy", ["evict", "cam", "h2o"])
def test_options_only_for_weightedkv(impl, policy):
    mod = ref if impl == "reference" else compiled_ops()
    st = random_state(1, 1, 8, 3, torch.float32, held=8, seed=1)
    with pytest.raises((RuntimeError, ValueError), match="compress: merge_target.*weightedkv"):
        mod.compress(*st, 5, 1, 1, policy, merge_target="similar")


def test_invalid_merged_tensor():
    ops = compiled_ops()
    st = random_state(1, 2, 8, 3, torch.float32, held=8, seed=1)
    with pytest.raises(RuntimeError, match="compress: merged must have shape"):
        ops.compress(*st, 5, 1, 1, "weightedkv", merged=torch.zeros(1, 2, 7))
    with pytest.raises(RuntimeError, match="compress: merged must have dtype"):
        ops.compress(*st, 5, 1, 1, "weightedkv", merged=torch.zeros(1, 2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="compress: merged and scores share memory|"
                                           "compress: scores and merged share memory"):
        ops.compress(*st, 5, 1, 1, "weightedkv", merged=st.scores)


@pytest.mark.parametrize("kw,needle", [
    (dict(merge_target="left"), "merge_target"), (dict(merge_weights="x"), "merge_weights"),
    (dict(merge_gate=2), "merge_gate"), (dict(merge_gate=True), "merge_gate"),
    (dict(policy="evict", merge_weights="mass"), "policy='weightedkv'")])
def test_cache_rejects_invalid_rule(kw, needle):
    kw = {"policy": "weightedkv", **kw}
    with pytest.raises(ValueError, match=f"WeightedKVCache: .*{needle}"):
        WeightedKVCache(16, **kw)
    assert policies.MERGE_TARGETS == ref.MERGE_TARGETS and policies.MERGE_WEIGHTS == ref.MERGE_WEIGHTS


# ---------------------------------------------------------------------------------------------
# engine: the merged counter is engine state (snapshots, batch reordering) and merge_stats


def _ids_engine(rule):
    return "-".join(f"{v}" for v in rule.values()) or "paper"


def _stream(engine, steps, seed=0, B=2, H=2, D=8, G=2):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        q = torch.randn(B, H * G, 3, D, generator=g)
        k = torch.randn(B, H, 3, D, generator=g)
        v = torch.randn(B, H, 3, D, generator=g)
        engine.attend(q, k, v)


class CheckedOps:
    """The compiled ops, with every compress replayed by the reference on copies first and
    compared bit for bit (the attention's float noise stays out: both see the same inputs)."""

    def __init__(self):
        self.real = compiled_ops()
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def compress(self, *args, **kw):
        copy = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        kcopy = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        ref.compress(*copy, **kcopy)
        self.real.compress(*args, **kw)
        for a, b in zip(args, copy):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
        assert torch.equal(kw["merged"], kcopy["merged"])
        self.calls.append({k: v for k, v in kw.items() if k.startswith("merge_")})


@pytest.mark.parametrize("rule", [{}, dict(merge_target="nearest", merge_weights="mass"),
                                  dict(merge_target="similar", merge_gate=0.2)], ids=_ids_engine)
def test_engine_passes_rule_and_counts_merges(rule):
    e = KVEngine(8, 1, 2, "weightedkv", chunk_size=3, **rule)
    e.ops = checked = CheckedOps()
    _stream(e, 6)
    assert checked.calls and all(c == {**policies.MERGE_RULE_DEFAULT, **rule}
                                 for c in checked.calls)
    stats = e.merge_stats()
    held = e.slot_pos >= 0
    assert torch.equal(stats["hist"].sum(-1), held.sum(-1))
    assert torch.equal(stats["max"], e.merged.long().amax(-1))
    assert int(e.merged.sum()) > 0 and bool((e.merged[~held] == 0).all())


def test_merged_survives_reorder_and_failed_call():
    e = KVEngine(8, 1, 2, "weightedkv", chunk_size=3, merge_weights="mass")
    _stream(e, 5)
    m = e.merged.clone()
    e.index_batch(torch.tensor([1, 0, 1]))
    assert torch.equal(e.merged, m[[1, 0, 1]])
    before = e.merged.clone()
    with pytest.raises(ValueError):
        e.attend(torch.randn(3, 4, 1, 8), torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 4))
    assert torch.equal(e.merged, before)

    class Boom(RuntimeError):
        pass

    real = e.ops

    class FailingOps:  # compress fails after merging: the snapshot must restore merged too
        def __getattr__(self, name):
            return getattr(real, name)

        def compress(self, *args, **kw):
            real.compress(*args, **kw)
            raise Boom

    e.ops = FailingOps()
    with pytest.raises(Boom):
        e.attend(torch.randn(3, 4, 2, 8), torch.randn(3, 2, 2, 8), torch.randn(3, 2, 2, 8))
    assert torch.equal(e.merged, before)


def test_cache_merge_stats():
    from weightedkv_ext.attention import weightedkv_attention_forward

    cache = WeightedKVCache(8, sinks=1, recent=2, chunk_size=2, merge_target="similar")
    assert cache.merge_stats()["max"].shape == (0, 0, 0)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        for layer in range(2):
            k, v = cache.update(torch.randn(1, 2, 2, 8, generator=g),
                                torch.randn(1, 2, 2, 8, generator=g), layer)
            weightedkv_attention_forward(None, torch.randn(1, 4, 2, 8, generator=g), k, v, None,
                                         scaling=8 ** -0.5)
    stats = cache.merge_stats()
    assert stats["max"].shape == (2, 1, 2)
    assert torch.equal(stats["hist"].sum(-1), cache.held_tokens())
    merged = torch.stack([layer.merged for layer in cache.layers]).long()
    assert torch.equal(stats["max"], merged.amax(-1))
    assert int(stats["max"].max()) >= 1


# ---------------------------------------------------------------------------------------------
# CUDA == CPU kernel, bit for bit (skipped without a GPU): both paths of compress.cu
# (one_removal: k == 1; sorted_removals: k > 1 and CaM), shared memory and global workspace.


CUDA_CASES = [  # (C, held, budget, sinks, recent): k = held - budget removals
    (40, 30, 29, 2, 3),  # one removal
    (40, 30, 12, 2, 3),  # many, shared memory
    (2000, 1900, 1899, 4, 60),  # one removal, large C
    (2000, 1900, 700, 4, 60),  # many, global workspace (32 B x 2048 > 48 KiB)
]
CUDA_POLICIES = [("weightedkv", r) for r in RULES] + [(p, {}) for p in ("evict", "h2o", "cam")]


@pytest.mark.parametrize("C,held,budget,sinks,recent", CUDA_CASES)
@pytest.mark.parametrize("policy,rule", CUDA_POLICIES,
                         ids=[p + ("-" + _ids(r) if r else "") for p, r in CUDA_POLICIES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_compress_matches_cpu(cuda_ops, dtype, policy, rule, C, held, budget, sinks,
                                   recent):
    base = random_state(2, 2, C, 64, dtype, held=lambda b, h: held - b - h, seed=21)
    merged = _random_merged(base, 22)
    outs = []
    for device in ("cpu", "cuda"):
        st = [t.to(device) for t in state_copy(base)]
        m = merged.clone().to(device)
        cuda_ops.compress(*st, budget, sinks, recent, policy, 5, 3, **rule, merged=m)
        outs.append([t.cpu() for t in (*st, m)])
    for name, g, w in zip((*ref.State._fields, "merged"), outs[1], outs[0]):
        assert torch.equal(g, w), f"{name} differs"


@pytest.mark.parametrize("impl", ["reference", "ops"])
def test_similar_tie_goes_right_and_gate_is_inclusive(impl):
    """Equal neighbour cosines pick the right neighbour; a cosine equal to the gate merges."""
    mod = ref if impl == "reference" else compiled_ops()
    st, m = six_tokens()
    st.keys[0, 0, 1] = torch.tensor([0., 1.])  # cos 0 with k_2
    st.keys[0, 0, 3] = torch.tensor([0., -1.])  # cos 0 with k_2: a tie
    mod.compress(*st, 5, 0, 0, "weightedkv", merge_target="similar", merged=m)
    assert m[0, 0].tolist() == [0, 0, 0, 1, 0, 0]  # merged into the right neighbour
    st, m = six_tokens()
    st.keys[0, 0, 3] = torch.tensor([2., 0.])  # cos exactly 1 with k_2
    mod.compress(*st, 5, 0, 0, "weightedkv", merge_gate=1.0, merged=m)
    assert m[0, 0].tolist() == [0, 0, 0, 1, 0, 0]  # cos == gate: merged
