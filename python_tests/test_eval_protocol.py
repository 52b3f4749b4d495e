"""The perplexity protocol (weightedkv_ext/eval/protocol.py) on a tiny random-weight Llama.

The harness's per-token NLLs are compared with an independent computation written with plain
transformers: the classic sliding-window recipe (whole-window forward, no cache, labels -100 for
the targets an earlier window already counted).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("weightedkv_ext", reason="weightedkv_ext is not built (bash scripts/build.sh)")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from weightedkv_ext.eval.caches import POLICIES, cache_factory, prepare  # noqa: E402
from weightedkv_ext.eval.protocol import batches, evaluate, plan_windows, token_forwards  # noqa: E402

VOCAB = 97
TOL = dict(rtol=1e-4, atol=1e-4)  # fp32, different kernels and summation orders


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return prepare(LlamaForCausalLM(cfg).eval())


@pytest.fixture(scope="module")
def docs():
    g = torch.Generator().manual_seed(1)
    # lengths: several full windows + a partial one, a document shorter than one window
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in (83, 29, 64)]


def independent_nll(model, docs, context):
    """{(doc, target index): nll} by the plain-transformers recipe (no cache, whole windows)."""
    stride, out = context // 2, {}
    with torch.inference_mode():
        for d, ids in enumerate(docs):
            prev_end = 0
            for begin in range(0, len(ids), stride):
                end = min(begin + context, len(ids))
                trg_len = end - prev_end
                window = ids[begin:end]
                labels = window.clone()
                labels[:-trg_len] = -100
                logits = model(window[None], use_cache=False).logits[0].float()
                nll = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")
                for i in torch.nonzero(labels[1:] != -100).flatten().tolist():
                    out[(d, begin + i + 1)] = float(nll[i])
                prev_end = end
                if end == len(ids):
                    break
    return out


def harness_nll(model, docs, context, policy="full", budget=None, chunk_size=1, batch=2, feed=7,
                backend="ops"):
    per_token = {}
    make = cache_factory(policy, budget, 4, None, chunk_size, backend=backend)
    totals = evaluate(model, docs, context, make, batch=batch, feed=feed, per_token=per_token)
    assert totals.tokens == len(per_token)
    assert totals.nll_sum == pytest.approx(math.fsum(per_token.values()), rel=1e-9)
    return per_token, totals


def _assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    keys = sorted(want)
    torch.testing.assert_close(torch.tensor([got[k] for k in keys]),
                               torch.tensor([want[k] for k in keys]), **TOL)


@pytest.mark.parametrize("context", [2, 4, 10, 16, 64])
@pytest.mark.parametrize("n", [1, 2, 3, 9, 10, 11, 16, 17, 23, 100])
def test_every_target_counts_once_first_window_all_then_last_half(n, context):
    windows = plan_windows(n, context, doc=5)
    counted = [t for w in windows for t in w.counted]
    assert sorted(counted) == list(range(1, n))  # targets 1..n-1, each exactly once
    if n < 2:
        return
    assert windows[0].start == 0 and windows[0].count_from == 1
    half = context // 2
    for i, w in enumerate(windows):
        assert w.doc == 5 and w.start == i * half and w.length <= context
        assert w.end == min(w.start + context, n)
        assert w.count_from > w.start  # a target needs at least one token before it
        if i and w.length == context:
            assert list(w.counted) == list(range(w.end - half, w.end))  # its last W/2 tokens
    assert windows[-1].end == n and all(w.end < n for w in windows[:-1])


def test_bad_context_is_refused():
    with pytest.raises(ValueError, match="context must be an even number >= 2, got context=7"):
        plan_windows(10, 7)


def test_batches_are_longest_first_and_forward_count_includes_padding():
    windows = [w for d, n in enumerate((30, 12)) for w in plan_windows(n, 8, d)]
    groups = batches(windows, 3)
    assert sorted(w for g in groups for w in g) == sorted(windows)
    lengths = [w.length for g in groups for w in g]
    assert lengths == sorted(lengths, reverse=True)
    assert token_forwards(windows, 3) == sum(len(g) * g[0].length for g in groups)


@pytest.mark.parametrize("context, batch", [(16, 1), (16, 3), (32, 2)])
def test_full_equals_independent_sliding_window_perplexity(model, docs, context, batch):
    want = independent_nll(model, docs, context)
    got, totals = harness_nll(model, docs, context, batch=batch)
    _assert_same(got, want)
    assert totals.tokens == sum(len(d) - 1 for d in docs)
    ppl_want = math.exp(math.fsum(want.values()) / len(want))
    assert math.exp(totals.nll_sum / totals.tokens) == pytest.approx(ppl_want, rel=1e-5)


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full"])
def test_budget_larger_than_the_window_equals_full(model, docs, policy):
    full, _ = harness_nll(model, docs, 16)
    got, _ = harness_nll(model, docs, 16, policy=policy, budget=20)
    _assert_same(got, full)


def test_compression_changes_the_loss_but_not_the_counted_tokens(model, docs):
    full, _ = harness_nll(model, docs, 32)
    got, _ = harness_nll(model, docs, 32, policy="weightedkv", budget=12)
    assert sorted(got) == sorted(full)
    late = [k for k in full if k[1] >= 13]  # positions beyond the budget see a compressed cache
    assert any(abs(got[k] - full[k]) > 1e-3 for k in late)
    early = [k for k in full if k[0] == 0 and k[1] <= 12]  # first window, cache not yet full
    _assert_same({k: got[k] for k in early}, {k: full[k] for k in early})


@pytest.mark.parametrize("policy", ["weightedkv", "cam"])
def test_feed_size_and_batching_do_not_change_results(model, docs, policy):
    """Token-by-token model calls, one window at a time, equal bigger calls and batches (the
    cache compresses after every token either way: chunk_size=1)."""
    one, _ = harness_nll(model, docs, 32, policy=policy, budget=12, batch=1, feed=1)
    if policy == "cam":  # CaM's random draw depends on the batch row: keep rows as they are
        many, _ = harness_nll(model, docs, 32, policy=policy, budget=12, batch=1, feed=32)
    else:
        many, _ = harness_nll(model, docs, 32, policy=policy, budget=12, batch=3, feed=13)
    _assert_same(many, one)


def test_chunk_size_larger_than_one_differs_from_the_paper_setting(model, docs):
    paper, _ = harness_nll(model, docs, 32, policy="weightedkv", budget=12, feed=8)
    chunked, _ = harness_nll(model, docs, 32, policy="weightedkv", budget=12, chunk_size=4, feed=8)
    assert sorted(paper) == sorted(chunked)
    assert any(abs(paper[k] - chunked[k]) > 1e-4 for k in paper)
