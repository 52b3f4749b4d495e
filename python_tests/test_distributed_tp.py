"""Tensor parallelism, for real: two processes on CPU (gloo) running transformers' TP.

One ``torchrun --nproc-per-node 2 python_tests/tp_worker.py`` launch (about 35 s on 2 cores) runs
every case: a tiny random Llama (GQA 4 query / 2 KV heads, and MHA 4 / 4) loaded with
``DistributedConfig(tp_plan="auto")``, every policy, a batch of two prompts without and with left
padding, budget 16 < 40-token prompts with chunk_size 8 (compression in prefill and decode),
12 greedy tokens. Each rank compares with the same model run unsharded in its own process (the
single-process run). Asserted here: equal tokens and logits, half the KV bytes per rank, and the
head layout ``weightedkv_ext.distributed.tp_layout`` detects equals what the DTensors hold.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

weightedkv_ext = pytest.importorskip(
    "weightedkv_ext", reason="weightedkv_ext is not built (bash scripts/build.sh)")

import tp_worker  # noqa: E402  (python_tests/ is on sys.path under pytest)

pytestmark = pytest.mark.slow  # one torchrun launch, about a minute on 2 cores

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT_S = 420  # ~35 s alone on 2 cores; generous for a loaded CI machine
DEVICE = os.environ.get("WKV_TP_DEVICE", "cpu")  # "cuda": NCCL on 2 GPUs (scripts/gpu_multi.sh)
LOGITS_TOL = 1e-4  # measured ~1.5e-6 (row-parallel all-reduce changes the summation order)

CASES = [(c, p, pol) for c in tp_worker.CONFIGS for p in (False, True)
         for pol in weightedkv_ext.POLICIES]


def _params():
    for config, padded, policy in CASES:
        yield pytest.param(config, padded, policy,
                           id=f"{config}-{'padded' if padded else 'unpadded'}-{policy}")


def _gloo_unavailable() -> str | None:
    import torch.distributed as dist
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this torch build"
    return None


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs the worker once; returns each rank's results (rank0.json, rank1.json)."""
    reason = _gloo_unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("tp")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={WORLD}", str(ROOT / "python_tests" / "tp_worker.py"),
           "--out", str(out)]
    if DEVICE == "cuda":
        if torch.cuda.device_count() < WORLD:
            pytest.skip(f"WKV_TP_DEVICE=cuda needs {WORLD} GPUs, found {torch.cuda.device_count()}")
        cmd += ["--device", "cuda", "--backend", "nccl"]
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # else transformers would shard onto the GPUs
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-3000:]
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s: {' '.join(cmd)}\n{tail!r}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                    f"{(proc.stdout + proc.stderr)[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _case(rank_result, config, padded, policy):
    (case,) = [c for c in rank_result["cases"]
               if (c["config"], c["padded"], c["policy"]) == (config, padded, policy)]
    assert "error" not in case, f"rank {rank_result['rank']}: {case['error']}"
    return case


def test_every_rank_ran_every_case(ranks):
    assert [r["rank"] for r in ranks] == list(range(WORLD))
    for r in ranks:
        assert r["world"] == WORLD
        assert {(c["config"], c["padded"], c["policy"]) for c in r["cases"]} == set(CASES)


@pytest.mark.parametrize("config", list(tp_worker.CONFIGS))
def test_head_layout_matches_the_shards(ranks, config):
    """tp_layout's offsets are the rows each rank's q_proj/k_proj DTensor shard holds, and every
    rank holds whole GQA groups of the global group size."""
    heads = tp_worker.CONFIGS[config]
    hq, hkv = heads["num_attention_heads"], heads["num_key_value_heads"]
    for r in ranks:
        for layer in r["layouts"][config]:
            assert layer["tp_rank"] == r["rank"] and layer["tp_size"] == WORLD
            assert (layer["global_q"], layer["global_kv"]) == (hq, hkv)
            assert (layer["local_q"], layer["local_kv"]) == (hq // WORLD, hkv // WORLD)
            assert layer["kv_head_offset"] == layer["dtensor_kv_offset"] == r["rank"] * hkv // WORLD
            assert layer["q_head_offset"] == layer["dtensor_q_offset"] == r["rank"] * hq // WORLD
            assert layer["local_q"] // layer["local_kv"] == hq // hkv


@pytest.mark.parametrize("config, padded, policy", list(_params()))
def test_tp_generate_equals_single_process(ranks, config, padded, policy):
    for r in ranks:
        case = _case(r, config, padded, policy)
        assert case["tp_tokens"] == case["ref_tokens"], f"rank {r['rank']}"
        assert case["max_logit_diff"] <= LOGITS_TOL, f"rank {r['rank']}"
        assert case["tp_held_max"] == case["ref_held_max"]
        if policy != "full":
            assert case["tp_held_max"] == tp_worker.CACHE["budget"]  # compression happened


@pytest.mark.parametrize("config, padded, policy",
                         [pytest.param(*c, id=f"{c[0]}-{'padded' if c[1] else 'unpadded'}-{c[2]}")
                          for c in CASES])
def test_tp_rank_holds_half_the_kv_bytes(ranks, config, padded, policy):
    """Each rank holds its half of the KV heads: exactly half the K/V bytes, and half the allocated
    bytes up to the per-row counters every rank keeps (< 1%)."""
    for r in ranks:
        case = _case(r, config, padded, policy)
        layers, batch, heads = case["ref_held_shape"]
        assert case["tp_held_shape"] == [layers, batch, heads // WORLD]
        assert case["tp_kv_bytes"] * WORLD == case["ref_kv_bytes"]
        assert case["tp_memory_bytes"] * WORLD >= case["ref_memory_bytes"]
        assert case["tp_memory_bytes"] * WORLD <= case["ref_memory_bytes"] * 1.01
