"""Prompt modes: how a ``KVEngine`` treats the prompt before decoding (docs/design.md, "Prompt modes").

* ``"stream"`` (default): the prompt streams through the cache like any other token; every chunk
  is compressed to ``budget`` by the policy (what the engine has always done).
* ``"snapkv"`` (SnapKV, Li et al., NeurIPS 2024, arXiv 2404.14469; kvpress's ``SnapKVPress``):
  the prompt is held uncompressed (or, with ``prompt_budget``, streamed down to that larger
  budget by the policy, so memory stays bounded on very long prompts); at the end of the prompt
  every (layer, row, KV head) is compressed once to ``budget`` by the attention that the last
  ``prompt_window`` queries (the question) pay to each held token, summed over the window,
  averaged over the GQA group, smoothed by a centred average pool of ``prompt_pool`` tokens in
  position order; the ``sinks`` first tokens and the window itself are always kept
  (``ops.snap_compress``). With ``prompt_merge`` the dropped values are merged WeightedKV-style
  into their kept right neighbour. Decoding then continues with ``policy``.

The prompt ends at the end of the first ``attend()`` call with more than one token
(``prompt_end="first_forward"``: a ``generate()`` prefill; each layer ends its prompt right after
its own attention, as kvpress does), or only when ``engine.end_prompt()`` /
``WeightedKVCache.end_prompt()`` is called (``prompt_end="manual"``: chunked prefill, custom
loops). After the end, the statistics of the kept tokens are the window's: ``scores`` = the
window's attention sum, ``counts`` = how many window queries saw the token, ``last`` = the last
query's attention; the policy continues from these (so ``weightedkv``/``evict`` rank a token by
its mean attention from the question, not by the whole prompt's).

The one table of the prompt options and their defaults is ``OPTIONS`` below.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import policies

PROMPT_MODES = ("stream", "snapkv")
PROMPT_ENDS = ("first_forward", "manual")
# name -> default (the engine's and WeightedKVCache's keyword arguments, in this order)
OPTIONS = dict(prompt_mode="stream", prompt_window=32, prompt_pool=15, prompt_budget=None,
               prompt_merge=False, prompt_end="first_forward")
PAPER = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024 " \
        "(arXiv 2404.14469)"


@dataclass(frozen=True)
class PromptConfig:
    mode: str
    window: int
    pool: int
    budget: int | None
    merge: bool
    end: str

    @property
    def snap(self) -> bool:
        return self.mode == "snapkv"


def options(owner: str, given: dict) -> dict:
    """The prompt options of an engine: the keyword arguments ``given`` over ``OPTIONS``'s
    defaults, in ``OPTIONS``'s order; a name not in ``OPTIONS`` is a TypeError naming it."""
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise TypeError(f"{owner}: unexpected keyword argument {unknown[0]!r} "
                        f"(prompt options: {', '.join(OPTIONS)})")
    return {**OPTIONS, **given}


def resolve(owner: str, policy: str, budget, sinks: int, recent: int, *, prompt_mode,
            prompt_window, prompt_pool, prompt_budget, prompt_merge, prompt_end) -> PromptConfig:
    """Check the prompt options of an engine (budget/sinks/recent already resolved)."""
    policies.check_choice(owner, "prompt_mode", prompt_mode, PROMPT_MODES)
    policies.check_choice(owner, "prompt_end", prompt_end, PROMPT_ENDS)
    if not isinstance(prompt_merge, bool):
        raise ValueError(f"{owner}: prompt_merge must be a bool, got prompt_merge={prompt_merge!r}")
    window = policies.as_int(owner, "prompt_window", prompt_window, 1)
    pool = policies.as_int(owner, "prompt_pool", prompt_pool, 1)
    if pool % 2 == 0:
        raise ValueError(f"{owner}: prompt_pool must be odd (a centred pooling kernel; 1 = no "
                         f"pooling), got prompt_pool={prompt_pool!r}")
    if prompt_budget is not None:
        prompt_budget = policies.as_int(owner, "prompt_budget", prompt_budget, 1)
    if prompt_mode == "snapkv" and policy != "full":
        if budget <= sinks + window:
            raise ValueError(f"{owner}: prompt_mode='snapkv' keeps the sinks and the observation "
                             f"window, so budget must exceed sinks + prompt_window, got "
                             f"budget={budget}, sinks={sinks}, prompt_window={window}; pass a "
                             "smaller prompt_window")
        if prompt_budget is not None and prompt_budget <= max(budget, sinks + max(recent, window)):
            raise ValueError(f"{owner}: prompt_budget must exceed budget ({budget}) and "
                             f"sinks + max(recent, prompt_window) "
                             f"({sinks + max(recent, window)}), got prompt_budget={prompt_budget}")
    return PromptConfig(prompt_mode, window, pool, prompt_budget, prompt_merge, prompt_end)


@dataclass
class PromptState:
    """Per engine, while the prompt runs: the last ``window`` queries of every row and what the
    window scoring needs of the attention call (scale, window, softcap, sinks). Replaced, never
    mutated (the engine's snapshot keeps the old one)."""

    active: bool = True
    query: Tensor | None = None  # [B, Hq, W, D]
    qpos: Tensor | None = None  # [B, W] int64, -1 = none
    scale: float = 1.0
    feats: tuple = (0, 0.0, None)


def in_prompt(engine) -> bool:
    return engine.prompt.snap and engine.policy != "full" and engine._prompt.active


def compress_args(engine):
    """While the prompt runs (snapkv): None (held uncompressed) or the prompt budget's args."""
    cfg = engine.prompt
    if cfg.budget is None:
        return None
    return cfg.budget, engine.sinks, max(engine.recent, cfg.window), engine.policy


def observe(engine, query: Tensor, qpos: Tensor, scale: float, feats) -> None:
    """Keep the last ``window`` queries of each row (by position) after a chunk."""
    st = engine._prompt
    W = engine.prompt.window
    q = query if st.query is None else torch.cat([st.query, query], 2)
    p = qpos if st.qpos is None else torch.cat([st.qpos, qpos], 1)
    if p.shape[1] > W:
        idx = p.topk(W, dim=1).indices.sort(dim=1).values  # the W largest positions, in order
        p = p.gather(1, idx)
        B, Hq, _, D = q.shape
        q = q.gather(2, idx[:, None, :, None].expand(B, Hq, W, D))
    engine._prompt = PromptState(True, q.clone(), p.clone(), scale, feats)


def index_batch(engine, index: Tensor) -> None:
    """Keep the window queries of rows ``index`` (beam search, batch_repeat_interleave)."""
    st = engine._prompt
    if st.query is not None:
        engine._prompt = PromptState(st.active, st.query.index_select(0, index),
                                     st.qpos.index_select(0, index), st.scale, st.feats)


def end(engine) -> None:
    """The prompt-end step (see the module docstring); marks the prompt ended."""
    st = engine._prompt
    engine._prompt = PromptState(active=False)
    if engine.window or not engine.is_initialized or st.query is None:
        return  # sliding-window layers keep their window; nothing held yet
    ops = engine.ops
    keys, values, scores, counts, last, slot_pos = engine.state
    ws, wc, wl = (torch.zeros_like(scores) for _ in range(3))
    window, softcap, sinks = st.feats
    ops.block_attention(st.query, keys, values, slot_pos, st.qpos, ws, wc, wl, st.scale,
                        engine.group_reduce, window=int(window or 0),
                        softcap=float(softcap or 0.0), sinks=sinks)
    scores.copy_(ws)
    counts.copy_(wc)
    last.copy_(wl)
    cfg = engine.prompt
    kept = ops.snap_compress(keys, values, scores, counts, last, slot_pos, engine.budget,
                             engine.sinks, cfg.window, cfg.pool, cfg.merge)
    _compact(engine, kept)


def _compact(engine, kept: Tensor) -> None:
    """Move the held tokens to slots ``0..`` in position order and shrink the storage to the
    decoding limit (``budget + chunk_size``), so memory drops to what streaming would hold."""
    C = engine.capacity
    limit = engine._limit()
    if limit is None or C <= limit:
        return
    idx = kept[:, :, :limit]
    valid = idx >= 0
    g = idx.clamp(min=0)
    B, H, _, D = engine.keys.shape
    gkv = g[..., None].expand(B, H, limit, D)
    engine.keys = engine.keys.gather(2, gkv)
    engine.values = engine.values.gather(2, gkv)
    for name in ("scores", "counts", "last"):
        setattr(engine, name, getattr(engine, name).gather(2, g).masked_fill(~valid, 0.0))
    engine.slot_pos = engine.slot_pos.gather(2, g).masked_fill(~valid, -1)


__all__ = ["PROMPT_MODES", "PROMPT_ENDS", "OPTIONS", "PromptConfig", "options", "resolve"]
