"""The command line ``python -m weightedkv_ext.eval`` on a tiny random-weight Llama saved with a
byte-level tokenizer: outputs, resume after an interruption, argument errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("weightedkv_ext", reason="weightedkv_ext is not built (bash scripts/build.sh)")
from weightedkv_ext.eval import cli, runner  # noqa: E402
from weightedkv_ext.eval.report import JSON_NAME, MD_NAME, PNG_NAME  # noqa: E402

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 4


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts")
    (path / "books").mkdir()
    (path / "books" / "a.txt").write_text(TEXT)
    (path / "books" / "b.txt").write_text(TEXT[::-1][:300])
    (path / "web.txt").write_text(TEXT.upper())
    return path


def _argv(model_dir, data_dir, out, *extra):
    return ["--model", str(model_dir), "--data", str(data_dir / "books"), str(data_dir / "web.txt"),
            "--contexts", "32,64", "--budgets", "12,20", "--max-tokens-per-doc", "150",
            "--batch", "3", "--no-progress", "--out", str(out), *extra]


def _results(out):
    cells = json.loads((out / JSON_NAME).read_text())["cells"]
    return {k: (c["nll_sum"], c["tokens"]) for k, c in cells.items()}


@pytest.fixture(scope="module")
def reference_run(model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_out")
    assert cli.main(_argv(model_dir, data_dir, out)) == 0
    return out


def test_outputs_table_json_and_plot(reference_run, capsys):
    data = json.loads((reference_run / JSON_NAME).read_text())
    # 2 datasets x 2 contexts x (full + 6 policies x 2 budgets)
    assert len(data["cells"]) == 2 * 2 * 13
    books = data["config"]["datasets"]["books"]
    assert books["docs"] == ["a.txt", "b.txt"] and books["doc_tokens"] == [150, 150]
    for c in data["cells"].values():
        targets = data["config"]["datasets"][c["dataset"]]["targets"]
        assert c["tokens"] == targets and c["nll_sum"] > 0 and c["forwards"] > 0
    run = data["runs"][0]
    assert run["cells_run"] == 52 and not run["interrupted"] and run["argv"][-1] == str(reference_run)
    assert {"torch", "transformers", "weightedkv_ext"} <= set(data["environment"])
    md = (reference_run / MD_NAME).read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert lines[0] == "| Budget | Policy | books 32 | books 64 | web 32 | web 64 |"
    assert lines[2].startswith("| - | Full cache |")
    assert lines[3].startswith("| 12 | StreamingLLM |") and lines[9].startswith("| 20 | StreamingLLM |")
    assert "chunk size 1 (paper setting" in md
    assert (reference_run / PNG_NAME).read_bytes()[:4] == b"\x89PNG"
    full = data["cells"]["books/ctx32/full"]
    assert f"{math.exp(full['nll_sum'] / full['tokens']):.2f}" in lines[2]


def test_resume_after_interruption_gives_the_same_results(model_dir, data_dir, reference_run,
                                                          tmp_path, monkeypatch):
    out = tmp_path / "out"
    # a subset of the cells first
    assert cli.main(_argv(model_dir, data_dir, out)[:-2] + ["--policies", "full,h2o", "--contexts", "64",
                                                            "--out", str(out)]) == 0
    assert len(_results(out)) == 2 * 3  # full + h2o at 2 budgets, 2 datasets
    # then the full command, interrupted (Ctrl-C) during its fourth new cell
    calls, evaluate = [], runner.evaluate

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", interrupting)
    assert cli.main(_argv(model_dir, data_dir, out)) == 130
    assert len(_results(out)) == 6 + 3
    assert json.loads((out / JSON_NAME).read_text())["runs"][-1]["interrupted"] is True
    monkeypatch.setattr(runner, "evaluate", evaluate)
    # the same command again finishes the rest
    assert cli.main(_argv(model_dir, data_dir, out)) == 0
    got, want = _results(out), _results(reference_run)
    assert list(got) == list(want)  # same cells, same order
    for k in want:
        assert got[k][1] == want[k][1]
        assert got[k][0] == pytest.approx(want[k][0], rel=1e-6), k
    # and once more: nothing to run, the JSON is left byte-identical
    before = (out / JSON_NAME).read_bytes()
    assert cli.main(_argv(model_dir, data_dir, out)) == 0
    assert (out / JSON_NAME).read_bytes() == before


@pytest.mark.parametrize("extra, words", [
    (["--budgets", "8", "--recent", "4"], ["--budgets", "budget 8", "sinks + recent = 4 + 4"]),
    (["--budgets", "6"], ["--budgets", "budget 6", "negative"]),
    (["--budgets", "0"], ["--budgets", "'0'"]),
    (["--policies", "full,lru"], ["--policies", "'lru'", "weightedkv"]),
    (["--contexts", "33"], ["--contexts", "33"]),
    (["--data", "/nonexistent/x.txt"], ["--data", "/nonexistent/x.txt"]),
    (["--model", "/nonexistent/model"], ["--model", "/nonexistent/model"]),
    (["--dtype", "float8"], ["--dtype", "float8"]),
    (["--group-reduce", "avg"], ["--group-reduce", "'avg'", "'mean'", "'sum'", "'max'"]),
])
def test_bad_arguments_exit_with_a_message_naming_them(model_dir, data_dir, tmp_path, capsys, extra, words):
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(model_dir, data_dir, tmp_path / "out") + extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err
    assert not (tmp_path / "out").exists()


def test_resuming_another_configuration_is_refused(model_dir, data_dir, reference_run, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(model_dir, data_dir, reference_run) + ["--chunk-size", "4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "chunk_size=1" in err and "chunk_size=4" in err


def test_group_reduce_is_parsed_with_mean_as_default():
    assert cli.parse_args([]).group_reduce == "mean"
    for r in ("mean", "sum", "max"):
        assert cli.parse_args(["--group-reduce", r]).group_reduce == r


def test_group_reduce_reaches_the_cache_and_is_recorded(model_dir, data_dir, tmp_path, monkeypatch):
    import weightedkv_ext.cache as cache_mod

    made = []

    class Recording(cache_mod.WeightedKVCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append((self.policy, self.group_reduce))

    monkeypatch.setattr(cache_mod, "WeightedKVCache", Recording)
    out = tmp_path / "out"
    argv = _argv(model_dir, data_dir, out)[:-2] + [
        "--policies", "weightedkv,tova", "--contexts", "32", "--budgets", "12",
        "--group-reduce", "max", "--out", str(out)]
    assert cli.main(argv) == 0
    assert {p for p, _ in made} == {"weightedkv", "tova"}
    assert {r for _, r in made} == {"max"}
    assert json.loads((out / JSON_NAME).read_text())["config"]["group_reduce"] == "max"
    assert "`group_reduce=max` (NOT the default `mean`)" in (out / MD_NAME).read_text()


def test_merge_rule_reaches_weightedkv_caches_only_and_is_recorded(model_dir, data_dir, tmp_path,
                                                                   monkeypatch):
    import weightedkv_ext.cache as cache_mod

    made = []

    class Recording(cache_mod.WeightedKVCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append((self.policy, self.merge_target, self.merge_gate, self.prompt_mode))

    monkeypatch.setattr(cache_mod, "WeightedKVCache", Recording)
    out = tmp_path / "out"
    argv = _argv(model_dir, data_dir, out)[:-2] + [
        "--policies", "weightedkv,tova", "--contexts", "32", "--budgets", "12",
        "--merge-target", "similar", "--merge-gate", "0.5", "--out", str(out)]
    assert cli.main(argv) == 0
    assert set(made) == {("weightedkv", "similar", 0.5, "stream"), ("tova", "right", 0.0, "stream")}
    rule = json.loads((out / JSON_NAME).read_text())["config"]["merge_rule"]
    assert rule == dict(merge_target="similar", merge_gate=0.5, merge_weights="average")


def test_resuming_with_another_group_reduce_is_refused(model_dir, data_dir, reference_run, tmp_path,
                                                       capsys):
    assert "group_reduce" not in (reference_run / MD_NAME).read_text()  # default: no note
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(model_dir, data_dir, reference_run) + ["--group-reduce", "sum"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "group_reduce='mean'" in err and "group_reduce='sum'" in err
    # a results file written before the option existed counts as group_reduce=mean
    old = tmp_path / "old"
    old.mkdir()
    data = json.loads((reference_run / JSON_NAME).read_text())
    del data["config"]["group_reduce"]
    (old / JSON_NAME).write_text(json.dumps(data))
    assert cli.main(_argv(model_dir, data_dir, old)) == 0  # nothing to run
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(_argv(model_dir, data_dir, old) + ["--group-reduce", "max"])
    assert "group_reduce='mean'" in capsys.readouterr().err


def test_chunk_size_is_labelled_when_not_the_paper_setting(model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    argv = _argv(model_dir, data_dir, out)[:-2] + ["--chunk-size", "4", "--policies", "weightedkv",
                                                  "--contexts", "32", "--budgets", "12", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "chunk size 4 (NOT the paper setting" in (out / MD_NAME).read_text()


def test_quick_preset_is_two_windows_at_context_512_and_options_override_it():
    from weightedkv_ext.eval.protocol import plan_windows

    args = cli.parse_args(["--quick"])
    assert (args.contexts, args.budgets, args.docs, args.out) == ([512], [64, 128], 1, "outputs/quick")
    assert args.policies == ["full", "streaming", "tova", "h2o", "cam", "evict", "weightedkv"]
    assert len(plan_windows(args.max_tokens_per_doc, 512)) == 2
    assert cli.parse_args(["--quick", "--budgets", "96"]).budgets == [96]


def test_domains_read_the_shared_evaldata(model_dir, tmp_path):
    from weightedkv_ext.eval.data import evaldata_dir

    root = evaldata_dir()
    if root is None or not (root / "web").is_dir():
        pytest.skip("../shared/evaldata/web is absent (eval texts are not shipped with the project)")
    out = tmp_path / "out"
    assert cli.main(["--model", str(model_dir), "--domains", "web", "--docs", "1", "--max-tokens-per-doc",
                     "40", "--contexts", "16", "--policies", "full", "--no-progress", "--out", str(out)]) == 0
    web = json.loads((out / JSON_NAME).read_text())["config"]["datasets"]["web"]
    assert web["docs"] == [sorted(p.name for p in (root / "web").glob("*.txt"))[0]]
    assert web["doc_tokens"] == [40]
