"""``python -m weightedkv_ext.eval --task {passkey,niah,kl}``: setup, plan, run, report."""
from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path


def main_task(args, argv=None) -> int:
    import torch

    from . import data as evdata
    from . import taskreport
    from .caches import default_recent, prompt_name
    from .cli import environment, resolve_texts, setup_model
    from .taskrun import Cell, ResumeError, TaskStore, plan, run_kl, run_retrieval
    from .tasks import NiahTask, PasskeyTask, TaskError

    parser = args.parser
    task = args.task
    texts = []
    if task == "kl" or (task == "niah" and (args.data or args.domains)):
        texts = resolve_texts(args)
    model, tokenizer, model_desc = setup_model(args)
    limit = getattr(model.config, "max_position_embeddings", None)
    extra = args.max_new_tokens_bound = 16
    for length in args.lengths:
        if limit is not None and length + (0 if task == "kl" else extra) > limit:
            parser.error(f"argument --lengths: length {length} (plus up to {extra} generated tokens) "
                         f"exceeds the model's context, max_position_embeddings={limit}; pass "
                         "shorter lengths")

    options = args.cache_options
    config = {"model": model_desc, "dtype": args.dtype,
              **options.config(prompt=args.prompt_modes != ["stream"])}
    generators, datasets = {}, []
    if task == "passkey":
        generators["filler"] = PasskeyTask(tokenizer, seed=args.seed)
    elif task == "niah":
        sources = texts or [evdata.default_dataset()]
        for ds in sources:
            text = "\n\n".join(t for _, t in ds.docs)
            try:
                generators[ds.name] = NiahTask(tokenizer, text, args.distractors, seed=args.seed)
            except TaskError as e:
                parser.error(str(e))
        config["distractors"] = args.distractors
    else:
        max_len = max(args.lengths)
        try:
            datasets = [evdata.tokenize(t, tokenizer, args.docs, max_len) for t in texts]
        except evdata.DataError as e:
            parser.error(str(e))
        config["protocol"] = ("first L tokens of each document (shorter ones skipped); the full "
                              "cache and each policy fed in lockstep; per position KL(p_full || "
                              "p_policy) in nats and top-1 agreement, averaged over the L positions "
                              "of a document, then over documents")
        config["datasets"] = {d.name: d.describe() for d in datasets}
    if task in ("passkey", "niah"):
        for name, g in generators.items():
            for length in args.lengths:
                try:
                    g.sample(length, 0.0, 0)
                except TaskError as e:
                    parser.error(str(e))
        config["max_new_tokens"] = next(iter(generators.values())).max_new_tokens
    task_name = next(iter(generators.values())).name if generators else task

    out = Path(args.out)

    def on_save(data):
        taskreport.write(data, out, plots=False)  # plots once, at the end

    try:
        store = TaskStore(out, task_name, config, environment(), on_save=on_save)
    except ResumeError as e:
        parser.error(str(e))

    store.data["config"]["min_full_accuracy"] = args.min_full_accuracy

    def recent_of(budget: int) -> int:
        return args.recent if args.recent is not None else default_recent(budget, args.sinks)

    factories = {}

    def make_cache(cell: Cell):
        key = (cell.policy, cell.budget, cell.sinks, cell.recent, cell.prompt)
        if key not in factories:
            factories[key] = options.factory(cell.policy, cell.budget, cell.sinks or 0,
                                             cell.recent, prompt=cell.prompt)
        return factories[key]()

    names = list(generators) if generators else [d.name for d in datasets]
    pools = args.prompt_pool
    prompts = [prompt_name(v, p, pools[0]) for v in args.prompt_modes
               for p in (pools if v != "stream" else pools[:1])]
    cells = plan(task_name, names, args.lengths, args.policies, args.budgets, args.sinks, recent_of,
                 prompts)
    record = {"argv": sys.argv[:1] + list(sys.argv[1:] if argv is None else argv),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "threads": torch.get_num_threads(), "batch": args.batch, "feed": args.feed}
    store.data["runs"].append(record)
    status = 0
    try:
        if task == "kl":
            full = options.factory("full", None, args.sinks, None)
            for ds in datasets:
                for length in args.lengths:
                    here = [c for c in cells if c.dataset == ds.name and c.length == length]
                    run_kl(model, ds, here, store, make_cache, full, length=length,
                           batch=args.batch, feed=args.feed, progress=not args.no_progress,
                           run_record=record, merge_stats=args.merge_stats)
        else:
            record["depths"], record["samples"] = list(args.depths), args.samples
            for name, g in generators.items():
                here = [c for c in cells if c.dataset == name]
                run_retrieval(model, tokenizer, g, here, store, make_cache, depths=args.depths,
                              samples=args.samples, batch=args.batch, feed=args.feed,
                              min_full=args.min_full_accuracy, chunk_size=args.chunk_size,
                              progress=not args.no_progress,
                              run_record=record)
        record["interrupted"] = False
    except KeyboardInterrupt:
        record["interrupted"] = True
        status = 130
    store.save()
    taskreport.write(store.data, out)
    print(taskreport.markdown(store.data))
    print(f"\nWrote {store.path} and {out / taskreport.md_name(task_name)} (+ plots)", file=sys.stderr)
    if status:
        print("Interrupted: finished batches are saved; rerun the same command to resume.",
              file=sys.stderr)
    return status
