"""End to end: SmolLM2-135M in vLLM's offline ``LLM`` with and without the plugin (needs vLLM).

Runs ``python -m weightedkv_ext.vllm.compare vllm`` twice in subprocesses (the plugin is chosen
per process, when vLLM loads plugins) on a prompt shorter than the budget and one four times
longer, and checks: the short prompt's generation is unchanged by the plugin; the long prompt's
generation is the project's own generate() with WeightedKVCache (EXPECTED, checked in the main
venv by test_vllm_expected.py) and differs from vLLM's without the plugin; the long prompt's
request holds a bounded number of KV blocks while decoding (vLLM's scheduler, read between
steps), where vLLM alone holds blocks for the whole context. Slow (two vLLM start-ups, ~3 min).
"""
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (see scripts/setup_vllm.sh)")

from test_vllm_expected import EXPECTED, LENGTHS, NEW, PLUGIN  # noqa: E402

from weightedkv_ext.vllm import settings  # noqa: E402


def _run(path, plugin=None):
    cmd = [sys.executable, "-m", "weightedkv_ext.vllm.compare", "vllm", "--out", str(path),
           "--lengths", ",".join(map(str, LENGTHS)), "--new-tokens", str(NEW)]
    if plugin:
        cmd += ["--plugin", plugin]
    env = {k: v for k, v in os.environ.items() if k != settings.ENV}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm") / "runs.json"
    _run(path)
    _run(path, PLUGIN)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_short_prompt_unchanged(runs):
    assert [len(p) for p in runs["prompts"]] == list(LENGTHS)
    base, plug = runs["vllm"]["outputs"], runs[f"vllm:{PLUGIN}"]["outputs"]
    assert LENGTHS[0] + NEW <= 256  # nothing is ever compressed
    assert plug[0] == base[0]


@pytest.mark.slow
def test_long_prompt_equals_generate_with_weightedkvcache(runs):
    plug = runs[f"vllm:{PLUGIN}"]["outputs"]
    assert plug[2] == EXPECTED
    assert runs["vllm"]["outputs"][2] != EXPECTED  # the compression changed the continuation


@pytest.mark.slow
def test_decode_memory_bounded_by_the_budget(runs):
    s = settings.parse(PLUGIN)
    plug = runs[f"vllm:{PLUGIN}"]
    assert plug["spec"] == "SlidingWindowSpec"
    bs = plug["block_size"]
    bound = math.ceil((s.window - 1 + 1) / bs) + 1
    held = plug["blocks"][str(LENGTHS[2])]
    base = runs["vllm"]["blocks"][str(LENGTHS[2])]
    assert held["decode"] <= bound, (held, bound)
    assert base["decode"] >= math.ceil((LENGTHS[2] + 1) / bs)  # vLLM alone keeps everything
    assert held["decode"] < base["decode"]
