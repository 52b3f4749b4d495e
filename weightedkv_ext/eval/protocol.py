"""The paper's sliding-window perplexity protocol: which windows, which tokens count, batched runs.

A document of ``n`` tokens is cut into windows of ``context`` tokens with stride ``context / 2``.
Every window starts from an empty cache. The first window counts the loss of all its targets
(tokens ``1 .. end-1``); each later window counts only the targets no earlier window counted, i.e.
its last ``context / 2`` tokens (fewer for a final, shorter window). So every target ``1 .. n-1``
of a document counts exactly once, whatever the context, and perplexity is
``exp(sum of NLL / number of counted targets)``.

Windows of a batch run together (right-padded to the longest one; padding sits after every real
token, so a causal model and a causal cache policy never let it influence a counted token). Tokens
are fed ``feed`` at a time; the cache itself compresses every ``chunk_size`` tokens (see
docs/design.md: chunking inside the attention equals feeding the model chunk by chunk).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True, order=True)
class Window:
    """Tokens ``[start, end)`` of document ``doc``; targets ``[count_from, end)`` count."""

    doc: int
    start: int
    end: int
    count_from: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def counted(self) -> range:
        """Absolute indices of the targets whose loss counts."""
        return range(self.count_from, self.end)


def plan_windows(n_tokens: int, context: int, doc: int = 0) -> list[Window]:
    """The windows of one document of ``n_tokens`` tokens (none if it has no target)."""
    if context < 2 or context % 2:
        raise ValueError(f"plan_windows: context must be an even number >= 2, got context={context}")
    if n_tokens < 2:
        return []
    stride = context // 2
    windows, start, count_from = [], 0, 1
    while True:
        end = min(start + context, n_tokens)
        windows.append(Window(doc, start, end, count_from))
        if end == n_tokens:
            return windows
        count_from, start = end, start + stride


def plan_dataset(doc_lengths: Sequence[int], context: int) -> list[Window]:
    return [w for i, n in enumerate(doc_lengths) for w in plan_windows(n, context, i)]


def batches(windows: Sequence[Window], batch: int) -> list[list[Window]]:
    """Groups of at most ``batch`` windows, longest first so that padding stays rare."""
    order = sorted(windows, key=lambda w: (-w.length, w.doc, w.start))
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def token_forwards(windows: Iterable[Window], batch: int) -> int:
    """Token positions the model processes for these windows, padding included (progress unit)."""
    return sum(len(g) * g[0].length for g in batches(list(windows), batch))


@dataclass
class Totals:
    nll_sum: float = 0.0
    tokens: int = 0
    forwards: int = 0


def run_batch(
    model,
    docs: Sequence[torch.Tensor],
    group: Sequence[Window],
    cache,
    feed: int,
    per_token: dict | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> Totals:
    """Run one batch of windows through ``model`` with the fresh ``cache``; sum their counted NLL.

    ``per_token``, if given, receives ``{(doc, target index): nll}`` for every counted target.
    ``on_tokens(n)`` is called after each forward with the number of token positions processed.
    """
    device = next(model.parameters()).device
    rows, width = len(group), max(w.length for w in group)
    inputs = torch.zeros(rows, width, dtype=torch.long)
    targets = torch.zeros(rows, width, dtype=torch.long)
    counted = torch.zeros(rows, width, dtype=torch.bool)
    for r, w in enumerate(group):
        tokens = docs[w.doc]
        inputs[r, : w.length] = tokens[w.start : w.end]
        inputs[r, w.length :] = tokens[w.end - 1]  # padding: any valid id, never counted
        # position i of the window predicts token start + i + 1
        targets[r, : w.length - 1] = tokens[w.start + 1 : w.end]
        counted[r, w.count_from - w.start - 1 : w.length - 1] = True
    inputs = inputs.to(device)
    totals = Totals()
    for s in range(0, width, feed):
        e = min(s + feed, width)
        keep = counted[:, s:e].any(0).nonzero().flatten()  # logits only where some row counts
        out = model(input_ids=inputs[:, s:e], **cache.as_kwargs(), use_cache=True,
                    logits_to_keep=keep.to(device))
        if keep.numel():
            logits = out.logits.float()  # [rows, len(keep), vocab]
            tgt = targets[:, s:e][:, keep].to(device)
            nll = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none")
            nll = nll.view(rows, -1).double().cpu()
            mask = counted[:, s:e][:, keep]
            totals.nll_sum += float(nll[mask].sum())
            totals.tokens += int(mask.sum())
            if per_token is not None:
                for r, w in enumerate(group):
                    for k, i in enumerate(keep.tolist()):
                        if mask[r, k]:
                            per_token[(w.doc, w.start + s + i + 1)] = float(nll[r, k])
        del out
        totals.forwards += rows * (e - s)
        if on_tokens is not None:
            on_tokens(rows * (e - s))
    return totals


@torch.inference_mode()
def evaluate(
    model,
    docs: Sequence[torch.Tensor],
    context: int,
    make_cache: Callable[[], object],
    batch: int = 1,
    feed: int = 256,
    per_token: dict | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> Totals:
    """Sliding-window NLL of ``docs`` (1-D int64 token tensors) at window ``context``.

    ``make_cache()`` returns an empty cache; one is made per batch of windows.
    """
    totals = Totals()
    for group in batches(plan_dataset([len(d) for d in docs], context), batch):
        t = run_batch(model, docs, group, make_cache(), feed, per_token, on_tokens)
        totals.nll_sum += t.nll_sum
        totals.tokens += t.tokens
        totals.forwards += t.forwards
    return totals
