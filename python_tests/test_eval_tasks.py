"""The retrieval / KL tasks of ``python -m weightedkv_ext.eval --task ...``: deterministic prompts
with the needle at the requested depth, exact-match scoring, Wilson intervals, KL against the full
cache, every task end to end on a tiny random-weight Llama, argument errors, the eval extra."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("weightedkv_ext", reason="weightedkv_ext is not built (bash scripts/build.sh)")
from weightedkv_ext.eval import cli, tasks  # noqa: E402
from weightedkv_ext.eval.taskrun import greedy, shared_prefix  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py

HAYSTACK = ("It is a truth universally acknowledged, that a single man in possession of a good "
            "fortune, must be in want of a wife. However little known the feelings or views of such "
            "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
            "minds of the surrounding families. My dear Mr. Bennet, said his lady to him one day, "
            "have you heard that Netherfield Park is let at last? Mr. Bennet replied that he had "
            "not. But it is, returned she; for Mrs. Long has just been here, and she told me all "
            "about it.\n\n")


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tokenizer():
    return _byte_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama_tasks")
    _byte_tokenizer().save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hay") / "austen.txt"
    path.write_text(HAYSTACK * 6)
    return path


# -- generators --------------------------------------------------------------------------------


def _generators(tokenizer):
    return [tasks.PasskeyTask(tokenizer, seed=3), tasks.NiahTask(tokenizer, HAYSTACK * 6, seed=3),
            tasks.NiahTask(tokenizer, HAYSTACK * 6, distractors=3, seed=3)]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["passkey", "niah", "niah_mk4"])
def test_generators_are_deterministic_for_a_seed(tokenizer, which):
    a = _generators(tokenizer)[which]
    b = _generators(tokenizer)[which]  # a fresh generator: nothing carried between instances
    for depth in (0, 37.5, 100):
        for i in range(3):
            assert a.sample(800, depth, i) == b.sample(800, depth, i)
    # different indices and seeds give different prompts and answers
    answers = {a.sample(800, 50, i).answer for i in range(8)}
    assert len(answers) >= 7
    other = type(a)(tokenizer, seed=4) if which == 0 else tasks.NiahTask(
        tokenizer, HAYSTACK * 6, distractors=a.distractors, seed=4)
    assert other.sample(800, 50, 0) != a.sample(800, 50, 0)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["passkey", "niah", "niah_mk4"])
@pytest.mark.parametrize("depth", [0, 10, 25, 50, 75, 90, 100])
def test_needle_sits_at_the_requested_depth_in_tokens(tokenizer, which, depth):
    g = _generators(tokenizer)[which]
    for length in (700, 1000):
        s = g.sample(length, depth, 1)
        assert len(s.ids) == length
        start, end = s.needle
        needle_text = tokenizer.decode(list(s.ids[start:end]))
        assert s.answer in needle_text and needle_text.count(s.answer) >= 1
        if which == 0:
            assert needle_text == " " + tasks.PASSKEY_NEEDLE.format(value=s.answer)
        else:
            assert needle_text.startswith(" One of the special magic numbers for ")
            key = needle_text.split(" for ")[1].split(" is:")[0]
            question = tokenizer.decode(list(s.ids[s.haystack[1]:]))
            assert question == "\n" + tasks.NIAH_QUESTION.format(key=key)
            # the answer is given once, by the queried needle (distractors carry other keys)
            assert tokenizer.decode(list(s.ids)).count(f" {key} is:") == 1
        # depth is measured in haystack tokens (between instruction and question, needles
        # excluded); the needle snaps to the nearest sentence boundary. The byte tokenizer has one
        # token per (ASCII) byte, so distractor needles are removed from the decoded text.
        h0, h1 = s.haystack
        before = _strip_needles(tokenizer.decode(list(s.ids[h0:start])))
        after = _strip_needles(tokenizer.decode(list(s.ids[end:h1])))
        offset, n_hay = len(before), len(before) + len(after)
        longest = max(len(tokenizer(" " + x)["input_ids"]) for x in
                      (tasks.PASSKEY_FILLER if which == 0 else tasks.split_sentences(HAYSTACK)))
        assert abs(offset - depth / 100 * n_hay) <= longest / 2 + 1
        if depth == 0:
            assert offset == 0
        if depth == 100:
            assert offset == n_hay


def _strip_needles(text: str) -> str:
    import re

    return re.sub(r" One of the special magic numbers for [a-z]+-[a-z]+ is: \d{7}\.", "", text)


def test_niah_distractors_have_other_keys_and_values(tokenizer):
    g = tasks.NiahTask(tokenizer, HAYSTACK * 6, distractors=3, seed=0)
    s = g.sample(900, 50, 0)
    text = tokenizer.decode(list(s.ids))
    import re

    found = re.findall(r"magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", text)
    assert len(found) == 4 and len({k for k, _ in found}) == 4
    assert sum(v == s.answer for _, v in found) == 1


def test_prompt_too_short_for_the_task_is_a_clear_error(tokenizer):
    g = tasks.PasskeyTask(tokenizer)
    with pytest.raises(tasks.TaskError, match=r"--lengths: passkey needs more than \d+ tokens"):
        g.sample(100, 50, 0)
    with pytest.raises(tasks.TaskError, match=r"--depths: .* 0\.\.100, got 101"):
        g.sample(800, 101, 0)


# -- scoring -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [" 12345.", "12345", " 12345 is the pass key", "\n12345\n",
                                  " is 12345, remember"])
def test_exact_match_accepts_the_answer(text):
    assert tasks.exact_match(text, "12345")


@pytest.mark.parametrize("text", [" 1234.", " 123456.", " 12354.", " 12 345", " 012345", "",
                                  " the pass key", " 54321 and 12345", " one two three"])
def test_exact_match_rejects_near_misses(text):
    assert not tasks.exact_match(text, "12345")


def test_wilson_interval_known_values():
    lo, hi = tasks.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = tasks.wilson(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    lo, hi = tasks.wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert tasks.wilson(0, 0) == (0.0, 1.0)


# -- runs on a tiny random Llama ---------------------------------------------------------------


def _run(model_dir, out, *extra):
    return cli.main(["--model", str(model_dir), "--no-progress", "--out", str(out),
                     "--chunk-size", "16", "--batch", "3", *extra])


def test_kl_is_zero_for_full_and_for_a_budget_above_the_length(model_dir, text_file, tmp_path):
    assert _run(model_dir, tmp_path, "--task", "kl", "--data", str(text_file), "--lengths", "96",
                "--policies", "full,weightedkv,h2o,streaming", "--budgets", "12,128") == 0
    data = json.loads((tmp_path / "results_kl.json").read_text())
    cells = data["cells"]
    assert len(cells) == 1 + 3 * 2
    for key, c in cells.items():
        (doc,) = c["results"].values()
        assert doc["positions"] == 96
        if c["policy"] == "full":  # the same computation as the reference: exactly 0
            assert doc["kl"] == 0.0 and doc["agree"] == 1.0, key
        elif c["budget"] == 128:
            # Nothing is ever evicted, but the slot count differs (full grows its capacity by
            # doubling, a policy holds budget + chunk_size slots), so the float32 matmuls over the
            # masked slots round differently: KL ~1e-11, not 0 (an engine property).
            assert doc["kl"] < 1e-9 and doc["agree"] == 1.0, key
        else:
            assert doc["kl"] > 1e-6 and doc["agree"] <= 1.0, key
    md = (tmp_path / "results_kl.md").read_text()
    (tmp_path / "results_kl.md").unlink()  # the tables can be rewritten from the JSON alone
    from weightedkv_ext.eval import taskreport

    assert taskreport.main([str(tmp_path)]) == 0
    assert (tmp_path / "results_kl.md").read_text() == md
    assert "| 12 |" in md and "WeightedKV" in md and (tmp_path / "kl_vs_budget.png").stat().st_size


@pytest.mark.parametrize("task", ["passkey", "niah"])
def test_retrieval_end_to_end_tiny_llama(model_dir, text_file, tmp_path, task):
    extra = ["--data", str(text_file), "--distractors", "2"] if task == "niah" else []
    lengths = "600,700" if task == "niah" else "320,400"
    argv = ["--task", task, "--lengths", lengths, "--depths", "0,50,100", "--samples", "2",
            "--policies", "full,weightedkv,cam", "--budgets", "40,64",
            "--min-full-accuracy", "0", *extra]
    assert _run(model_dir, tmp_path, *argv) == 0
    name = "passkey" if task == "passkey" else "niah_mk3"
    data = json.loads((tmp_path / f"results_{name}.json").read_text())
    assert len(data["cells"]) == 2 * (1 + 2 * 2)
    for c in data["cells"].values():
        assert c["complete"] and len(c["results"]) == 3 * 2
        for r in c["results"].values():
            assert r["ok"] == tasks.exact_match(r["output"], r["answer"])
    md = (tmp_path / f"results_{name}.md").read_text()
    assert "[" in md and "(n=6)" in md and "Per depth" in md
    for png in (f"{name}_heatmap_weightedkv.png", f"{name}_heatmap_full.png",
                f"{name}_acc_vs_budget.png"):
        assert (tmp_path / png).stat().st_size > 0
    # resume: more samples per depth run only the new prompts
    more = argv.copy()
    more[more.index("--samples") + 1] = "3"
    assert _run(model_dir, tmp_path, *more) == 0
    data = json.loads((tmp_path / f"results_{name}.json").read_text())
    assert data["runs"][-1]["samples_run"] == 2 * 5 * 3
    assert all(len(c["results"]) == 9 for c in data["cells"].values())


def test_merge_of_lanes_equals_one_run(model_dir, tmp_path, capsys):
    # Two lanes (other depths, their own --out) merged by taskreport --merge hold what one run of
    # all depths holds, sample for sample; a lane of another configuration is refused by name.
    from weightedkv_ext.eval import taskreport

    base = ["--task", "passkey", "--lengths", "320", "--samples", "2", "--batch", "1",
            "--policies", "full,weightedkv", "--budgets", "40", "--min-full-accuracy", "0"]
    assert _run(model_dir, tmp_path / "one", *base, "--depths", "0,50,100") == 0
    assert _run(model_dir, tmp_path / "a", *base, "--depths", "0,50") == 0
    assert _run(model_dir, tmp_path / "b", *base, "--depths", "100") == 0
    assert taskreport.main([str(tmp_path / "a"), str(tmp_path / "b"),
                            "--merge", str(tmp_path / "ab")]) == 0
    one = json.loads((tmp_path / "one/results_passkey.json").read_text())
    ab = json.loads((tmp_path / "ab/results_passkey.json").read_text())
    assert ab["config"] == one["config"] and len(ab["runs"]) == 2
    assert ab["cells"].keys() == one["cells"].keys()
    for key, cell in one["cells"].items():
        assert ab["cells"][key]["results"] == cell["results"], key
        assert ab["cells"][key]["complete"]
    assert (tmp_path / "ab/results_passkey.md").read_text().count("(n=6)") == 2
    # merging a folder with itself adds nothing
    assert taskreport.main([str(tmp_path / "ab"), str(tmp_path / "a"),
                            "--merge", str(tmp_path / "ab2")]) == 0
    again = json.loads((tmp_path / "ab2/results_passkey.json").read_text())
    assert again["cells"] == ab["cells"]
    assert _run(model_dir, tmp_path / "c", *base, "--depths", "100", "--chunk-size", "32") == 0
    with pytest.raises(SystemExit):
        taskreport.main([str(tmp_path / "a"), str(tmp_path / "c"), "--merge", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "chunk_size=32" in err and "chunk_size=16" in err and "one configuration" in err
    with pytest.raises(SystemExit):
        taskreport.main([str(tmp_path / "nowhere"), "--merge", str(tmp_path / "x")])
    assert "is not a folder" in capsys.readouterr().err


def test_balanced_merge_keeps_the_prompt_indices_of_every_depth(model_dir, tmp_path, capsys):
    # A top-up interrupted part-way (prompts run depth by depth) leaves a cell with more prompts at
    # some depths; --balanced keeps only the indices present at every depth, the rest untouched.
    from weightedkv_ext.eval import taskreport

    assert _run(model_dir, tmp_path / "a", "--task", "passkey", "--lengths", "320", "--samples",
                "2", "--batch", "1", "--policies", "full,weightedkv", "--budgets", "40",
                "--min-full-accuracy", "0", "--depths", "0,50") == 0
    data = json.loads((tmp_path / "a/results_passkey.json").read_text())
    key = "passkey/filler/len320/weightedkv/b40/s4/r16"
    whole = dict(data["cells"][key]["results"])
    assert sorted(whole) == ["0/0", "0/1", "50/0", "50/1"]
    del data["cells"][key]["results"]["50/1"]
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut/results_passkey.json").write_text(json.dumps(data))
    assert taskreport.main([str(tmp_path / "cut"), "--merge", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain/results_passkey.json").read_text())
    assert sorted(plain["cells"][key]["results"]) == ["0/0", "0/1", "50/0"]
    # groups of 2+ prompts per (cell, depth): full at 0 and 50, weightedkv at 0 (50 holds one)
    assert "of the 3 (cell, depth) groups" in (tmp_path / "plain/results_passkey.md").read_text()
    capsys.readouterr()
    assert taskreport.main([str(tmp_path / "cut"), "--merge", str(tmp_path / "even"),
                            "--balanced"]) == 0
    assert f"{key}: dropped 1 prompts" in capsys.readouterr().out
    even = json.loads((tmp_path / "even/results_passkey.json").read_text())
    assert even["cells"][key]["results"] == {k: whole[k] for k in ("0/0", "50/0")}
    assert even["cells"][key]["seconds"] < data["cells"][key]["seconds"]
    full = "passkey/filler/len320/full"
    assert even["cells"][full] == data["cells"][full]
    assert "(n=2)" in (tmp_path / "even/results_passkey.md").read_text()
    with pytest.raises(SystemExit):
        taskreport.main([str(tmp_path / "cut"), "--balanced"])
    assert "only with --merge" in capsys.readouterr().err


def test_sample_keys_round_trip():
    # one format, written by the runner and read back by balance, counts and unanimous
    assert tasks.sample_key(10.0, 3) == "10/3"
    for depth, index in [(0.0, 0), (12.5, 3), (100.0, 54)]:
        assert tasks.split_sample_key(tasks.sample_key(depth, index)) == (depth, index)


def test_unanimous_counts_depth_groups_whose_verdicts_agree():
    from weightedkv_ext.eval.taskreport import unanimous

    ok = lambda v: {"ok": v}  # noqa: E731
    cell = {"results": {"0/0": ok(True), "0/1": ok(False), "50/0": ok(True), "50/1": ok(True),
                        "50/2": ok(True), "100/0": ok(False)}}
    other = {"results": {"0/0": ok(False), "0/1": ok(False)}}
    assert unanimous([cell]) == (1, 2)
    assert unanimous([cell, other]) == (2, 3)
    assert unanimous([{"results": {"0/0": ok(True)}}]) == (0, 0)


def test_compressed_policies_only_where_the_full_cache_succeeds(model_dir, tmp_path):
    # a random-weight model never finds the pass key: nothing is compared, and the report says so
    assert _run(model_dir, tmp_path, "--task", "passkey", "--lengths", "320", "--depths", "50",
                "--samples", "2", "--policies", "full,weightedkv", "--budgets", "40") == 0
    data = json.loads((tmp_path / "results_passkey.json").read_text())
    assert list(data["cells"]) == ["passkey/filler/len320/full"]
    md = (tmp_path / "results_passkey.md").read_text()
    assert "n/c" in md and "cannot do the task at this length" in md


def test_shared_prefix_equals_separate_runs(model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from weightedkv_ext import WeightedKVCache
    from weightedkv_ext.eval.caches import prepare

    model = prepare(AutoModelForCausalLM.from_pretrained(model_dir)).eval()
    g = tasks.PasskeyTask(tokenizer)
    ids = torch.tensor([g.sample(400, 75, i).ids for i in range(3)])
    assert shared_prefix(ids, 4) > 200  # the filler before the needle is common
    for policy in ("weightedkv", "h2o", "full"):
        def make():
            return WeightedKVCache(None if policy == "full" else 40, policy=policy, chunk_size=4)
        together = greedy(model, ids, make(), 64, 6, chunk_size=4)
        alone = torch.cat([greedy(model, ids[r:r + 1], make(), 64, 6, chunk_size=4)
                           for r in range(3)])
        assert torch.equal(together, alone), policy


# -- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--task", "passkey", "--depths", "0,150"], r"--depths: .*0\.\.100, got 150"),
    (["--task", "passkey", "--depths", "-5"], r"--depths: .*0\.\.100, got -5"),
    (["--task", "retrieval"], r"--task: invalid choice: 'retrieval'"),
    (["--task", "niah", "--min-full-accuracy", "80"], r"--min-full-accuracy: expected a number in 0\.\.1"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_length_above_the_model_context_is_a_clear_error(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(model_dir, tmp_path, "--task", "passkey", "--lengths", "320,2000")
    err = capsys.readouterr().err
    assert "--lengths: length 2000" in err and "max_position_embeddings=1024" in err
    with pytest.raises(SystemExit):
        _run(model_dir, tmp_path, "--task", "passkey", "--lengths", "100")
    assert "--lengths: passkey needs more than" in capsys.readouterr().err


def test_data_dir_option_and_environment_variable(tmp_path, monkeypatch, capsys):
    from weightedkv_ext.eval import data as evdata

    (tmp_path / "novels").mkdir()
    (tmp_path / "novels" / "a.txt").write_text(HAYSTACK)
    monkeypatch.delenv(cli.EVALDATA_ENV, raising=False)
    args = cli.parse_args(["--domains", "novels", "--data-dir", str(tmp_path)])
    (ds,) = evdata.resolve(args.data, args.domains, args.data_dir)
    assert ds.name == "novels" and ds.docs == [("a.txt", HAYSTACK)]
    monkeypatch.setenv(cli.EVALDATA_ENV, str(tmp_path))
    args = cli.parse_args(["--domains", "novels"])
    assert args.data_dir == str(tmp_path)
    with pytest.raises(evdata.DataError, match="no evaldata domain 'poems'.*known domains: novels"):
        evdata.resolve([], ["poems"], args.data_dir)


# -- package boundary --------------------------------------------------------------------------


def test_library_import_needs_no_eval_extra():
    """``import weightedkv_ext`` (and its cache, the harness modules) work without matplotlib;
    running the harness without it is a clear error naming the extra. (tqdm, the extra's other
    package, is also a dependency of transformers itself, so it cannot be absent.)"""
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # not installed\n"
        "import weightedkv_ext, weightedkv_ext.cache, weightedkv_ext.attention\n"
        "import weightedkv_ext.eval, weightedkv_ext.eval.cli, weightedkv_ext.eval.runner\n"
        "import weightedkv_ext.eval.taskrun, weightedkv_ext.eval.taskreport\n"
        "from weightedkv_ext.eval import cli\n"
        "try:\n"
        "    cli.main(['--task', 'passkey'])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "exit 2" in r.stdout
    assert "needs 'matplotlib', part of the 'eval' extra" in r.stderr
    assert "pip install .[eval]" in r.stderr
