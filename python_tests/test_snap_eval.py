"""The eval harness's prompt modes (--prompt-modes): shared prefill + fork equals separate runs,
records and tables name the mode, argument errors."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("weightedkv_ext", reason="weightedkv_ext is not built (bash scripts/build.sh)")
from test_eval_tasks import model_dir, tokenizer  # noqa: E402,F401  (fixtures)
from weightedkv_ext.eval import cli, tasks  # noqa: E402
from weightedkv_ext.eval.taskrun import decode, fork, greedy, prefill  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("policy, merge", [("weightedkv", False), ("evict", True),
                                           ("tova", False), ("full", False)])
def test_fork_of_a_shared_prefill_equals_a_separate_run(model_dir, tokenizer, policy, merge):
    from transformers import AutoModelForCausalLM

    from weightedkv_ext import WeightedKVCache
    from weightedkv_ext.eval.caches import prepare

    model = prepare(AutoModelForCausalLM.from_pretrained(model_dir)).eval()
    g = tasks.PasskeyTask(tokenizer)
    ids = torch.tensor([g.sample(400, 50, i).ids for i in range(3)])

    def snap(p="h2o", m=False):
        if p == "full":
            return WeightedKVCache(None, policy="full", chunk_size=16)
        return WeightedKVCache(40, policy=p, chunk_size=16, prompt_mode="snapkv", prompt_window=8,
                               prompt_merge=m, prompt_end="manual")

    alone = greedy(model, ids, snap(policy, merge), 64, 6, chunk_size=16)
    carrier = snap()
    logits = prefill(model, ids, carrier, 64, chunk_size=16)
    forked = decode(model, logits, fork(carrier, lambda: snap(policy, merge)), 6)
    assert torch.equal(forked, alone)
    if policy != "full":  # the prompt was compressed once, to the budget
        stream = greedy(model, ids, WeightedKVCache(40, policy=policy, chunk_size=16), 64, 6,
                        chunk_size=16)
        assert stream.shape == forked.shape


def test_prompt_modes_end_to_end(model_dir, tmp_path):
    argv = ["--model", str(model_dir), "--no-progress", "--out", str(tmp_path), "--chunk-size",
            "16", "--batch", "3", "--task", "passkey", "--lengths", "320", "--depths", "0,100",
            "--samples", "2", "--policies", "full,weightedkv,evict", "--budgets", "40",
            "--prompt-modes", "stream,snapkv,snapkv_merge", "--prompt-window", "8",
            "--prompt-pool", "7,3", "--min-full-accuracy", "0"]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "results_passkey.json").read_text())
    assert len(data["cells"]) == 1 + 2 * 5
    modes = sorted(c["prompt_mode"] for c in data["cells"].values() if c["policy"] == "evict")
    assert modes == ["snapkv", "snapkv_merge", "snapkv_merge_p3", "snapkv_p3", "stream"]
    assert all(c["complete"] and len(c["results"]) == 4 for c in data["cells"].values())
    assert data["config"]["prompt_window"] == 8 and data["config"]["prompt_pool"] == 7
    md = (tmp_path / "results_passkey.md").read_text()
    assert "WeightedKV + SnapKV prompt |" in md and "Evict (no merge) + SnapKV prompt, merged" in md
    assert "WeightedKV + SnapKV prompt, merged, pool 3 |" in md
    assert (tmp_path / "passkey_heatmap_weightedkv_snapkv.png").stat().st_size > 0


def test_prompt_and_merge_options_reach_the_task_caches(model_dir, tmp_path, monkeypatch):
    import weightedkv_ext.cache as cache_mod

    made = []

    class Recording(cache_mod.WeightedKVCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append((self.policy, self.prompt_mode, self.prompt_window, self.prompt_pool,
                         self.prompt_end, self.merge_target))

    monkeypatch.setattr(cache_mod, "WeightedKVCache", Recording)
    argv = ["--model", str(model_dir), "--no-progress", "--out", str(tmp_path), "--chunk-size",
            "16", "--batch", "2", "--task", "passkey", "--lengths", "320", "--depths", "50",
            "--samples", "1", "--policies", "full,weightedkv,evict", "--budgets", "40",
            "--prompt-modes", "stream,snapkv", "--prompt-window", "8", "--prompt-pool", "5,3",
            "--merge-target", "nearest", "--min-full-accuracy", "0"]
    assert cli.main(argv) == 0
    assert set(made) == {
        ("full", "stream", 32, 15, "first_forward", "right"),
        ("weightedkv", "stream", 32, 15, "first_forward", "nearest"),
        ("evict", "stream", 32, 15, "first_forward", "right"),
        ("weightedkv", "snapkv", 8, 5, "manual", "nearest"),
        ("weightedkv", "snapkv", 8, 3, "manual", "nearest"),
        ("evict", "snapkv", 8, 5, "manual", "right"),
        ("evict", "snapkv", 8, 3, "manual", "right")}
    config = json.loads((tmp_path / "results_passkey.json").read_text())["config"]
    assert (config["prompt_window"], config["prompt_pool"]) == (8, 5)
    assert config["merge_rule"]["merge_target"] == "nearest"


@pytest.mark.parametrize("argv, message", [
    (["--task", "passkey", "--prompt-modes", "snap"], r"--prompt-modes: .*unknown prompt mode"),
    (["--task", "passkey", "--prompt-pool", "7,4"], r"--prompt-pool: must be odd"),
    (["--task", "passkey", "--prompt-modes", "snapkv", "--budgets", "32"],
     r"--prompt-window: budget 32 must exceed"),
    (["--task", "kl", "--prompt-modes", "snapkv"], r"--prompt-modes: only the passkey and niah"),
])
def test_prompt_mode_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    import re
    assert re.search(message, capsys.readouterr().err)
