"""Determinism on the CPU: the same inputs give bit-identical caches and outputs run after run,
whatever the thread count (docs/design.md: fixed reduction orders, no float atomics).

Each run happens in a fresh subprocess started with OMP_NUM_THREADS=n and torch.set_num_threads(n)
(the thread pool is sized once per process) and WKV_TEST_TASK_WORK=1 (csrc/cpu/cpu_common.h: every
(b, h) row is a task of its own, so with 2 threads every op really splits its work; the default
grain would run these small shapes inline on one thread) and prints a SHA-256 over every
resulting tensor: (1) the ops, every policy and dtype, the attention features included; (2) a
short model run (tiny random Llama, chunked prefill + decode steps) through a WeightedKVCache,
for two policies.

Run directly: ``python python_tests/test_determinism.py <threads>`` prints the fingerprints.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def ops_fingerprint() -> str:
    from helpers import compiled_ops, random_state

    ops = compiled_ops()
    out = []
    B, H, G, C, D, T = 4, 32, 2, 96, 32, 8  # 128 (b, h) rows, one task each
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for i, policy in enumerate(("weightedkv", "evict", "h2o", "tova", "streaming", "cam")):
            g = torch.Generator().manual_seed(i)
            st = random_state(B, H, C, D, dtype, held=lambda b, h: 60 + (b * 7 + h) % 28,
                              seed=i, pos_range=88)
            pos = torch.arange(88, 88 + T).repeat(B, 1)
            pos[1, :3] = -1
            ops.append(*st, torch.randn(B, H, T, D, generator=g).to(dtype),
                       torch.randn(B, H, T, D, generator=g).to(dtype), pos)
            probs = torch.rand(B, H * G, T, C, generator=g).softmax(-1)
            ops.accumulate(probs, st.slot_pos, pos, st.scores, st.counts, st.last, "mean")
            q = torch.randn(B, H * G, D, generator=g).to(dtype)
            o = ops.decode_attention(q, st.keys, st.values, st.slot_pos,
                                     torch.tensor([95, 94, -1, 95]), st.scores, st.counts,
                                     st.last, D ** -0.5, "max")
            sinks = torch.randn(H * G, generator=g)
            ob = ops.block_attention(torch.randn(B, H * G, T, D, generator=g).to(dtype),
                                     st.keys, st.values, st.slot_pos, pos, st.scores, st.counts,
                                     st.last, D ** -0.5, "sum", window=40, softcap=5.0,
                                     sinks=sinks)
            ops.compress(*st, 40, 4, 8, policy, cam_window=5, seed=7, head_offset=i)
            out += [*st, o, ob]
    return _digest(out)


def model_fingerprint() -> str:
    from test_validation_cache import ids, tiny_llama
    from weightedkv_ext import WeightedKVCache

    model = tiny_llama(layers=2, hidden=32)
    tokens = ids(400, batch=2, seed=5)
    out = []
    with torch.inference_mode():
        for policy in ("weightedkv", "tova"):
            cache = WeightedKVCache(budget=48, sinks=2, chunk_size=24, policy=policy)
            for s in range(0, 360, 72):
                out.append(model(tokens[:, s:s + 72], past_key_values=cache).logits)
            for s in range(360, 400):
                out.append(model(tokens[:, s:s + 1], past_key_values=cache).logits)
            for layer in cache.layers:
                out += list(layer.state)
    return _digest(out)


def fingerprints(threads: int) -> dict:
    # PASSIVE: idle OpenMP threads sleep instead of spinning (a busy 2-core box otherwise makes
    # every parallel region wait for a descheduled spinner: 10x slower, same results).
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OMP_WAIT_POLICY="PASSIVE", WKV_TEST_TASK_WORK="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(threads)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(line.split("=", 1) for line in res.stdout.split() if "=" in line)
    assert lines.get("threads") == str(threads), res.stdout
    return lines


@pytest.fixture(scope="module")
def runs():
    pytest.importorskip("weightedkv_ext", reason="weightedkv_ext is not built")
    return {"1": fingerprints(1), "2": fingerprints(2), "2 again": fingerprints(2)}


@pytest.mark.parametrize("what", ["ops", "model"])
def test_bit_identical_across_runs_and_thread_counts(runs, what):
    got = {name: r[what] for name, r in runs.items()}
    assert len(set(got.values())) == 1, got


if __name__ == "__main__":
    n = int(sys.argv[1])
    torch.set_num_threads(n)
    sys.path.insert(0, str(HERE))
    import warnings

    warnings.filterwarnings("ignore")
    print(f"threads={torch.get_num_threads()}")
    print(f"ops={ops_fingerprint()}")
    print(f"model={model_fingerprint()}")
