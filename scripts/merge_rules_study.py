"""The merge-rule study of issue #14 (docs/results.md, "merge rules"), on the eval harness.

Every rule x budget runs in lockstep with ONE full-cache reference per batch of documents (the
harness's ``run_kl``; the CLI would rerun the reference once per rule): per document the mean
next-token KL(p_full || p_rule), the top-1 agreement, the summed next-token NLL of the rule and of
the full cache (perplexity = exp(NLL / targets)) and the merge statistics (how many evicted
tokens the held slots absorbed). Results go to ``<out>/results_kl.json`` in the harness's format
(cell keys carry the rule); rerunning resumes.

    python scripts/merge_rules_study.py --data-dir ../shared/evaldata --domains books,web,math,code \\
        --docs 2 --length 2048 --budgets 64,128,256,512 --rules evict,paper,similar,nearest,mass,gate \\
        --out docs/eval/merge_rules --threads 1
    python scripts/merge_rules_study.py report docs/eval/merge_rules/*/results_kl.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import sys

# rule name -> (policy, merge options); "paper" is weightedkv's default rule
RULES = {
    "evict": ("evict", {}),
    "paper": ("weightedkv", {}),
    "similar": ("weightedkv", dict(merge_target="similar")),
    "nearest": ("weightedkv", dict(merge_target="nearest")),
    "mass": ("weightedkv", dict(merge_weights="mass")),
    "gate": ("weightedkv", dict(merge_gate=0.5)),
    "similar+mass": ("weightedkv", dict(merge_target="similar", merge_weights="mass")),
    "nearest+mass": ("weightedkv", dict(merge_target="nearest", merge_weights="mass")),
    "similar+gate": ("weightedkv", dict(merge_target="similar", merge_gate=0.5)),
    "nearest+gate": ("weightedkv", dict(merge_target="nearest", merge_gate=0.5)),
    "similar+gate+mass": ("weightedkv", dict(merge_target="similar", merge_gate=0.5,
                                             merge_weights="mass")),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--domains", default="books,web,math,code")
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--skip-docs", type=int, default=0,
                   help="skip the first N documents of each domain (split a study over processes)")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--budgets", default="64,128,256,512")
    p.add_argument("--rules", default="evict,paper,similar,nearest,mass,gate")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--feed", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    from weightedkv_ext.eval import data as evdata
    from weightedkv_ext.eval.caches import cache_factory, default_recent, prepare
    from weightedkv_ext.eval.cli import environment, load_model
    from weightedkv_ext.eval.taskrun import Cell, TaskStore, run_kl

    @dataclasses.dataclass(frozen=True)
    class RuleCell(Cell):
        rule: str = "paper"

        @property
        def key(self) -> str:
            return f"{super().key}/{self.rule}"

        def record(self) -> dict:
            return {**super().record(), "rule": self.rule, "merge": RULES[self.rule][1]}

    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        p.error(f"unknown rule {unknown[0]!r} (choose from {', '.join(RULES)})")
    budgets = [int(b) for b in args.budgets.split(",")]
    torch.set_num_threads(args.threads)
    model, tokenizer, desc = load_model("smollm2", "float32")
    model = prepare(model).eval()
    texts = evdata.resolve([], [d for d in args.domains.split(",") if d], args.data_dir)
    for t in texts:  # documents [skip, skip + docs) of each domain
        t.docs = t.docs[args.skip_docs:args.skip_docs + args.docs]
    datasets = [evdata.tokenize(t, tokenizer, None, args.length) for t in texts]
    config = {"model": desc, "dtype": "float32", "chunk_size": 1, "sinks": args.sinks,
              "protocol": "first L tokens of each document, empty cache, chunk size 1; full cache "
                          "and every rule in lockstep; KL(p_full || p_rule) and NLL per position",
              "rules": {r: {"policy": RULES[r][0], **RULES[r][1]} for r in rules},
              "datasets": {d.name: d.describe() for d in datasets}}
    store = TaskStore(args.out, "kl", config, environment())
    factories = {}

    def make_cache(cell):
        if cell.key not in factories:
            policy, rule = RULES[cell.rule]
            factories[cell.key] = cache_factory(policy, cell.budget, cell.sinks, cell.recent, 1,
                                                merge_rule=rule)
        return factories[cell.key]()

    # the full reference in chunks of 256: no compression, so the chunking changes only rounding
    full = cache_factory("full", None, args.sinks, None, 256)
    record = {"argv": sys.argv, "threads": args.threads, "batch": args.batch,
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    store.data["runs"].append(record)
    for ds in datasets:
        cells = [RuleCell("kl", ds.name, args.length, RULES[r][0], b, args.sinks,
                          default_recent(b, args.sinks), rule=r) for b in budgets for r in rules]
        run_kl(model, ds, cells, store, make_cache, full, length=args.length, batch=args.batch,
               feed=args.feed, progress=False, run_record=record, merge_stats=True)
    store.save()
    return 0


def report(paths) -> str:
    """Markdown tables from results_kl.json files of this script (several: merged by cell key).

    Per rule and budget, over every document present in all of that budget's rules: perplexity
    exp(sum NLL / sum targets), mean KL and top-1 agreement (per-document means averaged), and
    the merge statistics (largest absorbed count of one slot, mean over documents of the
    per-document maximum over layers x heads; share of held slots carrying >= 8 tokens)."""
    import json
    import math

    cells = {}
    for path in paths:
        cells.update(json.load(open(path))["cells"])
    by = {}  # (budget, rule) -> {doc: result}
    for c in cells.values():
        by.setdefault((c["budget"], c["rule"]), {}).update(c["results"])
    budgets = sorted({b for b, _ in by})
    rules = [r for r in RULES if any(r == x for _, x in by)]
    out = []
    ppl = {}
    for b in budgets:
        docs = set.intersection(*(set(by[(b, r)]) for r in rules if (b, r) in by))
        for r in rules:
            res = [by[(b, r)][d] for d in sorted(docs)] if (b, r) in by else []
            if not res:
                continue
            nll = sum(x["nll"] for x in res)
            tg = sum(x["targets"] for x in res)
            full = math.exp(sum(x["nll_full"] for x in res) / tg)
            kl = sum(x["kl"] for x in res) / len(res)
            ag = sum(x["agree"] for x in res) / len(res)
            mx = sum(x.get("merge_max", 0) for x in res) / len(res)
            heavy = [sum(x["merge_hist"][4:]) / max(1, sum(x["merge_hist"])) for x in res
                     if "merge_hist" in x]
            ppl[(b, r)] = math.exp(nll / tg)
            out.append((b, r, len(res), ppl[(b, r)], full, kl, ag, mx,
                        100 * sum(heavy) / max(1, len(heavy))))
    lines = ["| budget | rule | docs | ppl | ppl vs evict | KL (nats) | top-1 agree | max absorbed "
             "(mean over docs) | slots carrying >= 8 (%) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b, r, n, pp, full, kl, ag, mx, heavy in out:
        ev = ppl.get((b, "evict"))
        rel = f"{100 * (pp / ev - 1):+.2f}%" if ev else "-"
        lines.append(f"| {b} | {r} | {n} | {pp:.3f} | {rel} | {kl:.4f} | {100 * ag:.1f}% | "
                     f"{mx:.0f} | {heavy:.1f} |")
    if out:
        lines.append(f"\nFull cache perplexity on the same documents: {out[0][4]:.3f}.")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["report"]:
        print(report(sys.argv[2:]))
        sys.exit(0)
    sys.exit(main())
