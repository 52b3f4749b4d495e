"""torch.compile of a decoder with a WeightedKVCache (issue #15, item 3), on the CPU.

A decode step of a tiny Llama compiles to one graph (no graph break: the data-dependent work of
append / decode_attention / compress stays inside the ops, which have fake kernels), and the
compiled model decodes the same tokens with the same logits as eager within float tolerance.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_integration import tiny_llama, tokens  # noqa: E402

from weightedkv_ext.cache import WeightedKVCache  # noqa: E402


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def prefill(model, ids, budget=16):
    cache = WeightedKVCache(budget)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
    return cache, logits[:, -1:].argmax(-1)


def test_decode_step_has_no_graph_break():
    torch._dynamo.reset()
    model, ids = tiny_llama(), tokens(40)
    cache, nxt = prefill(model, ids)
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(nxt, past_key_values=cache, use_cache=True)
    reasons = [str(r.reason).splitlines()[0] for r in ex.break_reasons]
    assert ex.graph_break_count == 0, reasons
    assert ex.graph_count == 1


def test_compiled_decode_equals_eager():
    torch._dynamo.reset()
    model, ids = tiny_llama(), tokens(40)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    (c_eager, nxt_e), (c_comp, nxt_c) = prefill(model, ids), prefill(model, ids)
    with torch.no_grad():
        for _ in range(6):  # past the budget: every step compresses
            le = model(nxt_e, past_key_values=c_eager, use_cache=True).logits
            lc = compiled(nxt_c, past_key_values=c_comp, use_cache=True).logits
            torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
            nxt_e, nxt_c = le[:, -1:].argmax(-1), lc[:, -1:].argmax(-1)
            assert torch.equal(nxt_e, nxt_c)
    for le_, lc_ in zip(c_eager.layers, c_comp.layers):
        assert torch.equal(le_.engine.slot_pos, lc_.engine.slot_pos)
        torch.testing.assert_close(lc_.engine.values, le_.engine.values)
