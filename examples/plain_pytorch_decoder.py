"""A small decoder in plain PyTorch (RoPE, GQA, a generate loop) whose KV cache is swapped for
weightedkv's ``KVEngine`` in a few lines. No transformers anywhere.

    python examples/plain_pytorch_decoder.py [--tokens 2000] [--budget 64]

Each attention layer asks its cache for ``attend(q, k, v, scale=...)``: the naive ``ConcatCache``
concatenates and runs causal sdpa; ``KVEngine`` appends, attends, updates the statistics and
compresses to the budget. The swap is the one line in ``make_caches``.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from weightedkv_ext import KVEngine


class ConcatCache:
    """The naive cache: keep every key/value, attend with causal sdpa. Same call as KVEngine."""

    def __init__(self):
        self.k = self.v = None

    def attend(self, q, k, v, scale=None):
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        G = q.shape[1] // k.shape[1]
        K, V = self.k.repeat_interleave(G, 1), self.v.repeat_interleave(G, 1)
        T, L = q.shape[2], K.shape[2]
        causal = torch.ones(T, L, dtype=torch.bool).tril(L - T)
        return F.scaled_dot_product_attention(q, K, V, attn_mask=causal, scale=scale)

    def memory_bytes(self):
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


def make_caches(n_layers, budget=None, **engine_kwargs):
    """One cache per layer: the naive concat, or (the swap) a compressed KVEngine."""
    if budget is None:
        return [ConcatCache() for _ in range(n_layers)]
    return [KVEngine(budget=budget, **engine_kwargs) for _ in range(n_layers)]


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
                              ).to(x.dtype)


def rope(x, pos, theta=10000.0):
    """Rotary embedding (rotate-half layout) of ``x [B, H, T, D]`` at positions ``pos [T]``."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    freqs = pos[:, None].float() * inv[None, :]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, head_dim):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x, pos, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, pos), rope(k, pos)
        out = cache.attend(q, k, v, scale=self.head_dim ** -0.5)  # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, head_dim, hidden):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(dim), RMSNorm(dim)
        self.self_attn = Attention(dim, n_heads, n_kv_heads, head_dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, pos, cache):
        x = x + self.self_attn(self.input_layernorm(x), pos, cache)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Decoder(nn.Module):
    """A Llama-shaped decoder; ``forward(ids, caches)`` continues after the cached tokens."""

    def __init__(self, vocab=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 hidden=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, n_heads, n_kv_heads, head_dim, hidden)
                                    for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.seen = 0

    def forward(self, ids, caches):
        pos = torch.arange(self.seen, self.seen + ids.shape[1])
        self.seen += ids.shape[1]
        x = self.embed(ids)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, pos, cache)
        return self.lm_head(self.norm(x))

    @torch.inference_mode()
    def generate(self, ids, caches, new_tokens, on_step=None):
        self.seen = 0
        logits = self(ids, caches)
        out = [ids]
        for step in range(new_tokens):
            nxt = logits[:, -1:].argmax(-1)
            out.append(nxt)
            logits = self(nxt, caches)
            if on_step is not None:
                on_step(step + 1 + ids.shape[1], caches)
        return torch.cat(out, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=2000, help="context length reached")
    p.add_argument("--budget", type=int, default=64, help="KV slots per layer and head")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = Decoder(vocab=256, dim=64, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=16,
                    hidden=128).eval()
    prompt = torch.randint(0, 256, (1, 16))
    marks = {m for m in (128, 256, 512, 1024, 2048, 4096) if m <= args.tokens} | {args.tokens}
    rows = {}
    for name, caches in (("concat", make_caches(4)),
                         ("KVEngine", make_caches(4, budget=args.budget))):
        def record(n, caches, name=name):
            if n in marks:
                rows.setdefault(n, {})[name] = sum(c.memory_bytes() for c in caches)
        model.generate(prompt, caches, args.tokens - prompt.shape[1], on_step=record)
    print(f"KV memory of a 4-layer decoder (8 query / 2 KV heads, head_dim 16, fp32); "
          f"KVEngine budget {args.budget}:")
    print(f"{'context':>8} {'concat cache':>14} {'KVEngine':>10}")
    for n in sorted(rows):
        r = rows[n]
        print(f"{n:>8} {r['concat'] / 2**10:>11.0f} KiB {r['KVEngine'] / 2**10:>6.0f} KiB")
    assert math.isfinite(sum(rows[max(rows)].values()))


if __name__ == "__main__":
    main()
