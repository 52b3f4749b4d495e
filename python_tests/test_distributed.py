"""weightedkv_ext.distributed in one process: the head layout arithmetic and what is refused.

The two-process run with transformers' real tensor parallelism is test_distributed_tp.py.
"""
from __future__ import annotations

import pytest
import torch

weightedkv_ext = pytest.importorskip(
    "weightedkv_ext", reason="weightedkv_ext is not built (bash scripts/build.sh)")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402

from weightedkv_ext import distributed  # noqa: E402

# (query heads, KV heads, tp_size) that transformers' colwise sharding splits evenly.
EVEN = [(4, 2, 2), (4, 4, 2), (4, 1, 1), (8, 2, 2), (32, 8, 4), (32, 8, 8), (12, 12, 3)]


@pytest.mark.parametrize("hq, hkv, tp", EVEN)
def test_layout_keeps_every_query_head_with_its_kv_head(hq, hkv, tp):
    """Global query head q belongs to global KV head q // G (transformers' repeat_kv order); on
    every rank, local query head j must belong to local KV head j // G_local, i.e. global
    ``kv_head_offset + j // G_local``. And the ranks together hold every head exactly once."""
    G = hq // hkv
    seen_kv, seen_q = [], []
    for rank in range(tp):
        lay = distributed.layout_from_counts(hq // tp, hkv // tp, hq, hkv, rank, tp)
        g_local = lay.local_q_heads // lay.local_kv_heads
        for j in range(lay.local_q_heads):
            q = lay.q_head_offset + j
            assert q // G == lay.kv_head_offset + j // g_local
        seen_kv += range(lay.kv_head_offset, lay.kv_head_offset + lay.local_kv_heads)
        seen_q += range(lay.q_head_offset, lay.q_head_offset + lay.local_q_heads)
    assert seen_kv == list(range(hkv)) and seen_q == list(range(hq))


def test_layout_of_replicated_heads_is_offset_zero():
    """A plan that gathers q/k/v (every rank holds all heads) is not a head split: offset 0."""
    for rank in range(2):
        lay = distributed.layout_from_counts(4, 2, 4, 2, rank, 2)
        assert not lay.sharded and lay.kv_head_offset == lay.q_head_offset == 0


@pytest.mark.parametrize("local_q, local_kv, hq, hkv, tp", [
    (1, 1, 4, 2, 4),    # tp_size 4 > 2 KV heads: a rank would hold half a head
    (3, 1, 6, 3, 2),    # 3 KV heads over 2 ranks
    (2, 2, 4, 2, 2),    # the KV heads were replicated but the query heads were sharded
    (4, 1, 4, 2, 2),    # the query heads were not sharded: GQA groups cut across ranks
])
def test_layout_refuses_an_uneven_split(local_q, local_kv, hq, hkv, tp):
    with pytest.raises(ValueError, match=r"not split evenly.*tp_size must divide"):
        distributed.layout_from_counts(local_q, local_kv, hq, hkv, 0, tp)


@pytest.mark.parametrize("kw, match", [
    (dict(tp_rank=2, tp_size=2), "tp_rank must be in"),
    (dict(tp_rank=-1, tp_size=2), "tp_rank must be in"),
    (dict(local_kv_heads=0), "local_kv_heads must be >= 1"),
    (dict(global_q_heads=3), "not a multiple of"),
])
def test_layout_argument_errors_name_the_argument(kw, match):
    args = dict(local_q_heads=2, local_kv_heads=1, global_q_heads=4, global_kv_heads=2,
                tp_rank=0, tp_size=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        distributed.layout_from_counts(**args)


def _tiny(q=4, kv=2):
    cfg = LlamaConfig(vocab_size=32, hidden_size=8 * q, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=q, num_key_value_heads=kv, head_dim=8)
    return LlamaForCausalLM(cfg)


def test_layout_of_an_unsharded_module_is_offset_zero():
    """No DTensor parameter: not tensor parallel, offset 0 whatever the counts (a model whose
    layers have fewer heads than its config says still runs as before)."""
    attn = _tiny().model.layers[1].self_attn
    for q, kv in [(4, 2), (2, 1), (1, 1)]:
        lay = distributed.tp_layout(attn, q, kv)
        assert (lay.tp_rank, lay.tp_size, lay.kv_head_offset) == (0, 1, 0)
        assert distributed.kv_head_offset(attn, q, kv) == 0


def test_check_model_accepts_plain_and_evenly_sharded_models():
    model = _tiny()
    distributed.check_model(model)  # no distributed config
    model.config.distributed_config = DistributedConfig(tp_size=2)
    distributed.check_model(model)


def test_check_model_refuses_pipeline_parallelism():
    model = _tiny()
    model.config.distributed_config = DistributedConfig(tp_size=1, pp_size=2)
    with pytest.raises(ValueError, match=r"pipeline parallelism is not supported.*pp_size=2"):
        distributed.check_model(model)


@pytest.mark.parametrize("q, kv, tp", [(4, 2, 4), (6, 3, 2), (4, 4, 3)])
def test_check_model_refuses_a_tp_size_that_splits_heads(q, kv, tp):
    model = _tiny(q, kv)
    model.config.distributed_config = DistributedConfig(tp_size=tp)
    with pytest.raises(ValueError, match=rf"tp_size={tp} does not divide layer 0's {q} query / "
                                         rf"{kv} KV heads"):
        distributed.check_model(model)


def test_check_model_uses_the_models_tp_size():
    """from_pretrained(tp_plan=...) records the resolved size on the model (``_tp_size``)."""
    model = _tiny(4, 2)
    model._tp_size = 4
    with pytest.raises(ValueError, match="tp_size=4"):
        distributed.check_model(model)


def test_enable_refuses_pipeline_parallelism():
    model = _tiny()
    model.config.distributed_config = DistributedConfig(tp_size=1, pp_size=2)
    with pytest.raises(ValueError, match="pipeline parallelism is not supported"):
        weightedkv_ext.enable(model)
