"""The one Python table of compression policies, and the budget rules that go with them.

Everything that lists, names or validates a policy reads this module: the engine
(``engine.py``), ``WeightedKVCache``, ``ops.POLICIES`` (the kernels' names), the evaluation harness
and the README table. ``reference.py`` keeps a deliberate copy of the names (it must not depend on
the package); ``python_tests/test_policies.py`` checks that the two agree. The C++ kernels have
their own names table (``csrc``); the ops tests check it accepts exactly ``KERNEL_POLICIES``.

Importing this module imports nothing but the standard library.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """A compression policy: what it removes when a (layer, row, KV head) is over budget."""

    name: str  # the ``policy=`` string
    display: str  # the paper's name (tables, plots)
    removes: str  # which token is removed (the key of docs/design.md's compress table)
    merges: bool  # True: the removed value is merged into a kept one; False: dropped
    paper: str  # where it comes from
    compresses: bool = True  # False only for "full" (no kernel runs)


# Canonical order: rows of the result tables and lines of the plots (baselines first).
TABLE = (
    Policy("full", "Full cache", "nothing (the cache grows with the context)", False,
           "-", compresses=False),
    Policy("streaming", "StreamingLLM", "the oldest token after the sinks", False,
           "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024 "
           "(arXiv 2309.17453)"),
    Policy("tova", "TOVA", "the token the newest query attends to least", False,
           "Oren et al., Transformers are Multi-State RNNs, 2024 (arXiv 2401.06104)"),
    Policy("h2o", "H2O", "the token with the lowest accumulated attention", False,
           "Zhang et al., H2O: Heavy-Hitter Oracle, NeurIPS 2023 (arXiv 2306.14048)"),
    Policy("cam", "CaM", "the oldest token after the sinks, merged into the next values "
           "with a probability given by its attention", True,
           "Zhang et al., CaM: Cache Merging for Memory-efficient LLMs Inference, ICML 2024"),
    Policy("evict", "Evict (no merge)", "the token with the lowest average attention "
           "(WeightedKV's choice, dropped: the no-merge ablation)", False,
           "ablation of WeightedKV"),
    Policy("weightedkv", "WeightedKV", "the token with the lowest average attention, its "
           "value merged into its right neighbour's, weighted by their average attention", True,
           "Yuan et al., WeightedKV, ICASSP 2025 (arXiv 2503.01330)"),
)

BY_NAME = {p.name: p for p in TABLE}
POLICIES = tuple(p.name for p in TABLE)  # every policy=, table order
# The policies the compress kernel implements, in the kernels' (and reference.py's) order.
KERNEL_POLICIES = ("weightedkv", "evict", "h2o", "tova", "streaming", "cam")
assert set(KERNEL_POLICIES) == {p.name for p in TABLE if p.compresses}
GROUP_REDUCES = ("mean", "sum", "max")  # how the G query heads of a KV head make one score
DISPLAY = {p.name: p.display for p in TABLE}

DEFAULT_SINKS = 4  # the paper's attention sinks
# The one table of the engine's other defaults: KVEngine, WeightedKVCache and the harness's
# CacheOptions read it (the op schemas in csrc/torch_bindings.cpp carry the op-level ones, and
# reference.py its deliberate copy; python_tests/test_engine.py checks all of them against it).
OPTIONS = dict(chunk_size=128, cam_window=16, seed=0, group_reduce="mean", backend="ops")

# weightedkv's merge rule (compress's merge_target / merge_gate / merge_weights; the first entry
# and 0.0 are the paper's; csrc/kernels/merge.h documents each). Kernels: kMergeTargetNames,
# kMergeWeightingNames; reference.py keeps a copy (python_tests/test_policies.py).
MERGE_TARGETS = ("right", "similar", "nearest")
MERGE_WEIGHTS = ("average", "mass")
MERGE_RULE_DEFAULT = dict(merge_target="right", merge_gate=0.0, merge_weights="average")
MERGE_RULE_PAPERS = {
    "similar": "the more key-similar neighbour (the independent test of issue #14)",
    "nearest": "the most key-similar held token: kvpress MergingPress / KVMerger "
               "(Wang et al., arXiv 2407.08454)",
    "gate": "key-cosine gate: CaM (Zhang et al., ICML 2024), D2O (Wan et al., arXiv 2406.13035)",
    "mass": "weights from the mass each slot carries: KeepKV (Tian et al., arXiv 2504.09936)",
}


def check_choice(owner: str, name: str, value, choices: tuple):
    """``value`` when it is one of ``choices``; else a ValueError naming the option, the value
    and the choices."""
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {name}={value!r}")
    return value


def check_merge_rule(owner: str, policy: str, merge_target="right", merge_gate=0.0,
                     merge_weights="average") -> dict:
    """Validate weightedkv's merge-rule options; returns them as a dict of compress kwargs."""
    check_choice(owner, "merge_target", merge_target, MERGE_TARGETS)
    check_choice(owner, "merge_weights", merge_weights, MERGE_WEIGHTS)
    gate = 0.0 if merge_gate is None else merge_gate
    if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 <= gate <= 1:
        raise ValueError(f"{owner}: merge_gate must be a key cosine in [0, 1] (0 or None = no "
                         f"gate), got merge_gate={merge_gate!r}")
    rule = dict(merge_target=merge_target, merge_gate=float(gate), merge_weights=merge_weights)
    if rule != MERGE_RULE_DEFAULT and policy != "weightedkv":
        raise ValueError(f"{owner}: merge_target/merge_gate/merge_weights change weightedkv's "
                         f"merge and apply only to policy='weightedkv', got policy={policy!r} "
                         f"with {rule}; leave them at their defaults")
    return rule


def default_recent(budget: int, sinks: int) -> int:
    """The paper's rule: half of the budget is the recent window, sinks included."""
    return budget // 2 - sinks


def is_default_group(budget: int, sinks: int, recent: int) -> bool:
    """True when (sinks, recent) are the defaults for this budget (tables print only the budget)."""
    return sinks == DEFAULT_SINKS and recent == default_recent(budget, sinks)


INT64_MAX = 2 ** 63 - 1  # the ops take int64 arguments


def as_int(owner: str, name: str, value, minimum: int) -> int:
    """``value`` as a Python int (anything with ``__index__``, e.g. ``numpy.int64``; not bool)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {name}={value!r}") \
            from None
    if v < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {name}={value!r}")
    if v > INT64_MAX:
        raise ValueError(f"{owner}: {name} must be an int <= 2**63 - 1 (int64), "
                         f"got {name}={value!r}")
    return v


def resolve(owner: str, policy: str, budget, sinks, recent) -> tuple[int | None, int, int]:
    """Check ``policy`` and the budget arguments; returns ``(budget, sinks, recent)`` as ints.

    ``recent=None`` means ``default_recent(budget, sinks)``. ``policy="full"`` accepts
    ``budget=None`` (no compression). Otherwise ``budget > sinks + recent`` is required.
    """
    check_choice(owner, "policy", policy, POLICIES)
    sinks = as_int(owner, "sinks", sinks, 0)
    if policy == "full" and budget is None:
        return None, sinks, as_int(owner, "recent", 0 if recent is None else recent, 0)
    budget = as_int(owner, "budget", budget, 1)
    if recent is None:
        recent = default_recent(budget, sinks)
        if recent < 0:
            raise ValueError(f"{owner}: recent defaults to budget // 2 - sinks, which is negative "
                             f"for budget={budget}, sinks={sinks}; pass recent explicitly")
    recent = as_int(owner, "recent", recent, 0)
    if policy != "full" and budget <= sinks + recent:
        raise ValueError(f"{owner}: budget must exceed sinks + recent, got budget={budget}, "
                         f"sinks={sinks}, recent={recent}")
    return budget, sinks, recent


def markdown_table() -> str:
    """The README's policy table."""
    rows = ["| `policy=` | name | removes | merges | reference |", "|---|---|---|---|---|"]
    rows += [f"| `{p.name}` | {p.display} | {p.removes} | {'yes' if p.merges else 'no'} | "
             f"{p.paper} |" for p in TABLE]
    return "\n".join(rows)
