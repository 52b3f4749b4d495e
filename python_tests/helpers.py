"""Shared test helpers: the reference module, the compiled ops, random cache states, tolerances."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Every op registered as torch.ops.weightedkv.<name> (csrc/torch_bindings.cpp).
OPS = ("append", "accumulate", "compress", "decode_attention", "block_attention", "snap_compress")


def _load_reference():
    try:
        from weightedkv_ext import reference
        return reference
    except ImportError:  # extension not built: the reference is a standalone file
        spec = importlib.util.spec_from_file_location(
            "weightedkv_reference", ROOT / "weightedkv_ext" / "reference.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


ref = _load_reference()
State = ref.State
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# Attention outputs / hand-computed merges: fp32 up to float32 rounding, fp16/bf16 about one ulp.
TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def compiled_ops():
    """weightedkv_ext.ops, or skip the test when the extension is not built."""
    try:
        import weightedkv_ext
    except ImportError as e:
        pytest.skip(f"weightedkv_ext is not built (bash scripts/build.sh): {e}")
    return weightedkv_ext.ops


def impl(name: str):
    """The implementation under test: "reference" or "ops" (the compiled kernels)."""
    return ref if name == "reference" else compiled_ops()


def layout(t: torch.Tensor, strided: bool) -> torch.Tensor:
    """A copy of t: contiguous, or a non-contiguous view (dims reversed, every other element)."""
    if not strided:
        return t.clone()
    n = t.dim()
    buf = torch.full((*reversed(t.shape), 2), 7, dtype=t.dtype, device=t.device)
    view = buf[..., 0].permute(*reversed(range(n)))
    view.copy_(t)
    return view


def state_copy(state, strided: bool = False) -> State:
    return State(*(layout(t, strided) for t in state))


def random_state(B, H, C, D, dtype, held, seed, pos_range=None) -> State:
    """A random cache: `held` tokens per (b, h) (an int or a callable (b, h) -> int) in random
    slots, increasing positions drawn from range(pos_range) and permuted over the slots. Stats are
    small integers / dyadic fractions so that averages tie often; a few are exactly zero."""
    g = torch.Generator().manual_seed(seed)
    st = ref.new_state(B, H, C, D, dtype)
    st.keys.copy_(torch.randn(B, H, C, D, generator=g))
    st.values.copy_(torch.randn(B, H, C, D, generator=g))
    pos_range = pos_range or 3 * C
    for b in range(B):
        for h in range(H):
            L = held(b, h) if callable(held) else held
            slots = torch.randperm(C, generator=g)[:L]
            pos = torch.randperm(pos_range, generator=g)[:L].sort().values
            st.slot_pos[b, h, slots] = pos
            n = torch.randint(1, 4, (L,), generator=g).float()
            a = torch.randint(1, 9, (L,), generator=g).float() * n / 8  # avg in {1/8, ..., 1}
            a[torch.rand(L, generator=g) < 0.1] = 0.0  # a few zero scores
            n[torch.rand(L, generator=g) < 0.05] = 0.0  # and zero counts (avg 0 by definition)
            st.counts[b, h, slots] = n
            st.scores[b, h, slots] = a
            st.last[b, h, slots] = torch.randint(0, 4, (L,), generator=g).float() / 8
    return st


def held_count(slot_pos: torch.Tensor) -> torch.Tensor:
    return (slot_pos >= 0).sum(-1)


def stream(op, policy, steps, B=2, H=2, D=8, budget=8, sinks=2, recent=2, chunk=3, seed=0,
           dtype=torch.float32, padding=True, check=None) -> State:
    """Run append -> accumulate (random attention, GQA 2) -> compress chunk by chunk with `op`
    (the reference or the compiled ops); call check(before, after, n_real_tokens_per_row) after
    every compress. Row 1 gets left-padding tokens."""
    g = torch.Generator().manual_seed(seed)
    st = ref.new_state(B, H, budget + chunk, D, dtype)
    n = [0] * B
    for _ in range(steps):
        T = int(torch.randint(1, chunk + 1, (1,), generator=g))
        pos = torch.full((B, T), -1, dtype=torch.long)
        for b in range(B):
            real = T - (int(torch.randint(0, T, (1,), generator=g)) if padding and b == 1 else 0)
            pos[b, T - real:] = torch.arange(n[b], n[b] + real)
            n[b] += real
        op.append(*st, torch.randn(B, H, T, D, generator=g).to(dtype),
                  torch.randn(B, H, T, D, generator=g).to(dtype), pos)
        probs = torch.rand(B, 2 * H, T, st.keys.shape[2], generator=g)
        op.accumulate(probs, st.slot_pos, pos, st.scores, st.counts, st.last)
        before = state_copy(st)
        op.compress(*st, budget, sinks, recent, policy, seed=seed)
        if check is not None:
            check(before, st, n)
    return st


def assert_states_equal(got, want) -> None:
    """The six cache tensors are equal (exactly; NaN == NaN)."""
    for name, g, w in zip(State._fields, got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
