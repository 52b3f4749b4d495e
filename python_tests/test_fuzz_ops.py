"""Hypothesis fuzzing of the compiled ops against the pure-PyTorch reference.

Random shapes (small), dtypes, policies, budgets, layouts and random call sequences of append,
accumulate, decode_attention and compress, interleaved with invalid calls:
* every valid call leaves the compiled cache equal to the reference's (exactly for append,
  accumulate, compress and counts; decode_attention's output and float statistics within a
  per-dtype tolerance, after which the reference takes the kernel's statistics so that later
  discrete decisions are compared exactly);
* every invalid call raises RuntimeError/ValueError/TypeError naming the op and leaves every
  tensor bit-identical.

Reproducible: derandomize=True, database=None. Example counts: WKV_FUZZ_EXAMPLES scales the
default run (1.0); the `long` tests (pytest -m long) run 20x as many.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import TOL, compiled_ops, layout, random_state, ref, state_copy

SCALE = float(os.environ.get("WKV_FUZZ_EXAMPLES", "1"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
POLICIES = ref.POLICIES
REDUCES = ref.GROUP_REDUCES
STAT_TOL = dict(rtol=1e-5, atol=1e-6)
OUT_TOL = {**TOL, torch.float32: dict(rtol=1e-5, atol=1e-6)}


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), derandomize=True, database=None,
                    deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Fuzz:
    """One fuzzed cache: the reference state, the compiled-op state (maybe strided) and the
    per-row position counters, with the valid and invalid calls drawn from hypothesis."""

    def __init__(self, data):
        self.data = data
        self.draw = data.draw
        self.ops = compiled_ops()
        self.dtype = self.draw(st.sampled_from(DTYPES), label="dtype")
        self.B = self.draw(st.integers(1, 2), label="B")
        self.H = self.draw(st.integers(1, 2), label="H")
        self.G = self.draw(st.integers(1, 2), label="G")
        self.D = self.draw(st.sampled_from([1, 3, 8, 0]), label="D")
        self.budget = self.draw(st.integers(1, 6), label="budget")
        self.sinks = self.draw(st.integers(0, self.budget - 1), label="sinks")
        self.recent = self.draw(st.integers(0, self.budget - 1 - self.sinks), label="recent")
        self.tmax = self.draw(st.integers(1, 4), label="tmax")
        self.C = self.budget + self.tmax
        self.policy = self.draw(st.sampled_from(POLICIES), label="policy")
        self.reduce = self.draw(st.sampled_from(REDUCES), label="group_reduce")
        self.window = self.draw(st.integers(1, 3), label="cam_window")
        self.seed = self.draw(st.integers(-5, 5), label="seed")
        self.gen = torch.Generator().manual_seed(self.draw(st.integers(0, 2 ** 16), label="g"))
        held = self.draw(st.integers(0, self.C), label="held")
        start = random_state(self.B, self.H, self.C, self.D, self.dtype, held=held,
                             seed=self.draw(st.integers(0, 99), label="state seed"),
                             pos_range=held)
        self.next_pos = [held] * self.B
        self.want = state_copy(start)
        strided = self.draw(st.booleans(), label="strided")
        self.got = state_copy(start, strided=strided)
        # weightedkv's merged counter (small integers on the held slots, as after some merges)
        m = torch.randint(0, 4, start.scores.shape, generator=self.gen).float()
        self.merged_want = torch.where(start.slot_pos >= 0, m, torch.zeros_like(m))
        self.merged_got = layout(self.merged_want.clone(), strided)

    # -- random inputs ------------------------------------------------------------------------

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen).to(self.dtype)

    def probs(self, Q):
        p = torch.rand(self.B, self.H * self.G, Q, self.C, generator=self.gen)
        kind = self.draw(st.sampled_from(["plain", "zeros", "ties", "specials"]), label="probs")
        if kind == "zeros":
            p[p < 0.5] = 0.0
        elif kind == "ties":
            p = (p * 4).floor() / 4
        elif kind == "specials" and p.numel() > 0:
            flat = p.view(-1)
            idx = torch.randint(0, flat.numel(), (3,), generator=self.gen)
            flat[idx] = torch.tensor([float("nan"), float("inf"), 1e-45])
        p_dtype = self.draw(st.sampled_from(DTYPES), label="probs dtype")
        return layout(p.to(p_dtype), self.draw(st.booleans(), label="probs strided"))

    def new_positions(self, T):
        """Per row: padding (-1) at random columns, the next real positions elsewhere."""
        pos = torch.full((self.B, T), -1, dtype=torch.long)
        for b in range(self.B):
            for t in range(T):
                if self.draw(st.integers(0, 4), label="pad?") > 0:
                    pos[b, t] = self.next_pos[b]
                    self.next_pos[b] += 1
        return pos

    def query_positions(self, Q):
        top = max(self.next_pos) + 1
        return torch.tensor([[self.draw(st.integers(-1, top), label="qpos") for _ in range(Q)]
                             for _ in range(self.B)], dtype=torch.long)

    # -- valid calls ----------------------------------------------------------------------------

    def append(self):
        T = self.draw(st.integers(0, self.tmax), label="T")
        pos = self.new_positions(T)
        real = (pos >= 0).sum(1)  # [B]
        free = (self.want.slot_pos == -1).sum(-1).min(-1).values  # [B]: the fullest head
        nk, nv = self.randn(self.B, self.H, T, self.D), self.randn(self.B, self.H, T, self.D)
        if bool((real > free).any()):  # would overflow: an invalid call (checked as such)
            self.next_pos = [p - int((pos[b] >= 0).sum()) for b, p in enumerate(self.next_pos)]
            self.expect_error("append", (*self.got, nk, nv, pos), "append: not enough free slots")
            return
        ref.append(*self.want, nk, nv, pos)
        self.ops.append(*self.got, nk, nv, pos)
        self.check_exact("append")

    def accumulate(self):
        Q = self.draw(st.integers(0, 3), label="Q")
        probs, qpos = self.probs(Q), self.query_positions(Q)
        ref.accumulate(probs, self.want.slot_pos, qpos, *self.want[2:5], self.reduce)
        self.ops.accumulate(probs, self.got.slot_pos, qpos, *self.got[2:5], self.reduce)
        self.check_exact("accumulate")

    def decode(self):
        query = self.randn(self.B, self.H * self.G, self.D)
        qpos = self.query_positions(1)[:, 0]
        scale = self.draw(st.sampled_from([1.0, 0.125, 3.0, 0.0, -0.5]), label="scale")
        w, g = self.want, self.got
        out_w = ref.decode_attention(query, w.keys, w.values, w.slot_pos, qpos, w.scores,
                                     w.counts, w.last, scale, self.reduce)
        out_g = self.ops.decode_attention(query, g.keys, g.values, g.slot_pos, qpos, g.scores,
                                          g.counts, g.last, scale, self.reduce)
        assert out_g.shape == out_w.shape and out_g.dtype == out_w.dtype
        torch.testing.assert_close(out_g, out_w, **OUT_TOL[self.dtype], equal_nan=True)
        assert torch.equal(g.counts, w.counts) and torch.equal(g.slot_pos, w.slot_pos)
        torch.testing.assert_close(g.scores, w.scores, **STAT_TOL, equal_nan=True)
        torch.testing.assert_close(g.last, w.last, **STAT_TOL, equal_nan=True)
        w.scores.copy_(g.scores)  # float noise of the softmax must not decide later evictions
        w.last.copy_(g.last)
        self.check_exact("decode_attention")

    def compress(self):
        budget = self.draw(st.integers(self.sinks + self.recent + 1, self.budget + 2),
                           label="compress budget")
        args = (budget, self.sinks, self.recent, self.policy, self.window, self.seed)
        rule = {}
        if self.policy == "weightedkv":  # the merge-rule options (issue #14)
            rule = dict(
                merge_target=self.draw(st.sampled_from(ref.MERGE_TARGETS), label="merge_target"),
                merge_gate=self.draw(st.sampled_from([0.0, 0.3, 1.0]), label="merge_gate"),
                merge_weights=self.draw(st.sampled_from(ref.MERGE_WEIGHTS), label="merge_weights"))
        ref.compress(*self.want, *args, **rule, merged=self.merged_want)
        self.ops.compress(*self.got, *args, **rule, merged=self.merged_got)
        self.check_exact("compress")
        assert torch.equal(self.merged_got, self.merged_want), "after compress: merged differs"
        held = (self.got.slot_pos >= 0).sum(-1)
        assert int(held.max()) <= budget

    def check_exact(self, what):
        for name, g, w in zip(ref.State._fields, self.got, self.want):
            assert torch.equal(g, w) or (g.is_floating_point() and torch.equal(g.isnan(), w.isnan())
                                         and torch.equal(g.nan_to_num(), w.nan_to_num())), \
                f"after {what}: {name} differs"

    # -- invalid calls --------------------------------------------------------------------------

    def expect_error(self, op, args, needle=None):
        before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
            getattr(self.ops, op)(*args)
        msg = str(info.value)
        assert msg.startswith(f"{op}: ") or f"weightedkv::{op}()" in msg, msg
        if needle is not None:
            assert needle in msg, msg
        for a, b in zip(args, before):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"{op} wrote before failing"
        self.check_exact(f"rejected {op}")

    def invalid(self):
        g, B, H, C, D = self.got, self.B, self.H, self.C, self.D
        kind = self.draw(st.sampled_from(sorted(INVALID)), label="invalid")
        op, args = INVALID[kind](self, g, B, H, C, D)
        self.expect_error(op, args)


def _cache_args(g, **override):
    names = ref.State._fields
    return tuple(override.get(n, t) for n, t in zip(names, g))


def _append(f, g, B, H, C, D, **kw):
    T = 1
    new = dict(new_keys=f.randn(B, H, T, D), new_values=f.randn(B, H, T, D),
               new_pos=torch.full((B, T), -1, dtype=torch.long))
    new.update({k: v for k, v in kw.items() if k in new})
    cache = _cache_args(g, **{k: v for k, v in kw.items() if k not in new})
    return "append", (*cache, new["new_keys"], new["new_values"], new["new_pos"])


def _accumulate(f, g, B, H, C, D, probs=None, qpos=None, scores=None, counts=None, reduce="mean"):
    probs = torch.rand(B, H, 1, C) if probs is None else probs
    qpos = torch.zeros(B, 1, dtype=torch.long) if qpos is None else qpos
    return "accumulate", (probs, g.slot_pos, qpos, g.scores if scores is None else scores,
                          g.counts if counts is None else counts, g.last, reduce)


def _decode(f, g, B, H, C, D, query=None, scale=1.0, qpos=None, last=None):
    query = f.randn(B, H, D) if query is None else query
    qpos = torch.zeros(B, dtype=torch.long) if qpos is None else qpos
    return "decode_attention", (query, g.keys, g.values, g.slot_pos, qpos, g.scores, g.counts,
                                g.last if last is None else last, scale)


def _compress(f, g, B, H, C, D, budget=None, sinks=0, recent=0, policy="weightedkv", window=16,
              **kw):
    budget = f.budget if budget is None else budget
    return "compress", (*_cache_args(g, **kw), budget, sinks, recent, policy, window, 0)


INVALID = {
    "append: new_keys dtype": lambda f, g, B, H, C, D: _append(
        f, g, B, H, C, D, new_keys=torch.zeros(B, H, 1, D, dtype=torch.float64)),
    "append: new_pos shape": lambda f, g, B, H, C, D: _append(
        f, g, B, H, C, D, new_pos=torch.zeros(B, 2, dtype=torch.long)),
    "append: new_values head_dim": lambda f, g, B, H, C, D: _append(
        f, g, B, H, C, D, new_values=torch.zeros(B, H, 1, D + 1, dtype=f.dtype)),
    "append: counts aliases scores": lambda f, g, B, H, C, D: _append(f, g, B, H, C, D,
                                                                      counts=g.scores),
    "append: expanded slot_pos": lambda f, g, B, H, C, D: _append(
        f, g, B, H, C, D, slot_pos=torch.tensor(-1).expand(B, H, C)),
    "accumulate: probs C": lambda f, g, B, H, C, D: _accumulate(
        f, g, B, H, C, D, probs=torch.rand(B, H, 1, C + 1)),
    "accumulate: zero query heads": lambda f, g, B, H, C, D: _accumulate(
        f, g, B, H, C, D, probs=torch.rand(B, 0, 1, C)),
    "accumulate: group_reduce": lambda f, g, B, H, C, D: _accumulate(f, g, B, H, C, D,
                                                                     reduce="min"),
    "accumulate: query_pos int32": lambda f, g, B, H, C, D: _accumulate(
        f, g, B, H, C, D, qpos=torch.zeros(B, 1, dtype=torch.int32)),
    "accumulate: counts is scores": lambda f, g, B, H, C, D: _accumulate(f, g, B, H, C, D,
                                                                         counts=g.scores),
    "accumulate: probs int": lambda f, g, B, H, C, D: _accumulate(
        f, g, B, H, C, D, probs=torch.ones(B, H, 1, C, dtype=torch.long)),
    "decode: query head_dim": lambda f, g, B, H, C, D: _decode(
        f, g, B, H, C, D, query=torch.zeros(B, H, D + 2, dtype=f.dtype)),
    "decode: query dtype": lambda f, g, B, H, C, D: _decode(
        f, g, B, H, C, D, query=torch.zeros(B, H, D, dtype=torch.float64)),
    "decode: scale nan": lambda f, g, B, H, C, D: _decode(f, g, B, H, C, D, scale=float("nan")),
    "decode: query_pos rank": lambda f, g, B, H, C, D: _decode(
        f, g, B, H, C, D, qpos=torch.zeros(B, 1, dtype=torch.long)),
    "decode: last aliases scores": lambda f, g, B, H, C, D: _decode(f, g, B, H, C, D,
                                                                    last=g.scores),
    "compress: budget <= sinks + recent": lambda f, g, B, H, C, D: _compress(
        f, g, B, H, C, D, budget=f.sinks + f.recent, sinks=f.sinks, recent=f.recent),
    "compress: sinks overflow": lambda f, g, B, H, C, D: _compress(
        f, g, B, H, C, D, sinks=2 ** 62, recent=2 ** 62),
    "compress: negative recent": lambda f, g, B, H, C, D: _compress(f, g, B, H, C, D, recent=-1),
    "compress: unknown policy": lambda f, g, B, H, C, D: _compress(f, g, B, H, C, D,
                                                                   policy="random"),
    "compress: cam_window 0": lambda f, g, B, H, C, D: _compress(f, g, B, H, C, D, policy="cam",
                                                                 window=0),
    "compress: counts dtype": lambda f, g, B, H, C, D: _compress(
        f, g, B, H, C, D, counts=g.counts.double()),
    "compress: keys shape": lambda f, g, B, H, C, D: _compress(
        f, g, B, H, C, D, keys=torch.zeros(B, H, C + 1, D, dtype=f.dtype)),
    "compress: budget not an int": lambda f, g, B, H, C, D: _compress(f, g, B, H, C, D,
                                                                      budget=2.5),
}

CALLS = ["append", "append", "accumulate", "accumulate", "decode", "compress", "compress",
         "invalid"]


@fuzz_settings(2000)
@given(data=st.data())
def test_fuzz_call_sequences(data):
    f = Fuzz(data)
    for _ in range(data.draw(st.integers(1, 8), label="steps")):
        getattr(f, data.draw(st.sampled_from(CALLS), label="call"))()


@fuzz_settings(600)
@given(data=st.data())
def test_fuzz_single_compress(data):
    """One compress of a random cache (held up to capacity, any budget): the widest spread of
    removal counts, ties (dyadic statistics) and layouts."""
    f = Fuzz(data)
    f.compress()


@pytest.mark.long
@fuzz_settings(20 * 2000)
@given(data=st.data())
def test_fuzz_call_sequences_long(data):
    f = Fuzz(data)
    for _ in range(data.draw(st.integers(1, 24), label="steps")):
        getattr(f, data.draw(st.sampled_from(CALLS), label="call"))()
