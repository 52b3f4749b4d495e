"""The vLLM plugin's attention backend against the project's own WeightedKVCache (needs vLLM).

No model: the test plays vLLM's part around ``WeightedKVAttentionImpl.forward`` (paged KV cache,
block table, a sliding-window block manager that frees old blocks and hands them to the other
request) and checks that every output equals, bit for bit, the project's transformers attention
(``weightedkv_attention_forward`` over a ``WeightedKVCache``) fed the same q/k/v. Freed blocks are
poisoned (NaN keys/values, huge positions), so reading anything outside the window fails.
Skipped where vLLM is not installed (the main environment); run it with scripts/test_vllm.sh.
"""
import math

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (see scripts/setup_vllm.sh)")

from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec  # noqa: E402

from weightedkv_ext import WeightedKVCache  # noqa: E402
from weightedkv_ext.attention import weightedkv_attention_forward  # noqa: E402
from weightedkv_ext.vllm import backend, settings  # noqa: E402

H, G, D, BS, NUM_BLOCKS = 2, 2, 16, 4, 96
PLUGIN = "budget=24,sinks=2,recent=6,chunk_size=8"


@pytest.fixture
def plugin_env(monkeypatch):
    monkeypatch.setenv(settings.ENV, PLUGIN)
    return settings.parse(PLUGIN)


def _impl(scale):
    return backend.WeightedKVAttentionImpl(
        num_heads=H * G, head_size=D, scale=scale, num_kv_heads=H, alibi_slopes=None,
        sliding_window=None, kv_cache_dtype="auto")


class _Request:
    """One request as vLLM's SlidingWindowManager sees it, and the project's cache for it."""

    def __init__(self, s, generator):
        self.blocks: list[int] = []  # like the worker's block table row: freed ids stay stale
        self.freed = 0  # leading blocks given back (replaced by the null block in the scheduler)
        self.L = 0
        self.cache = WeightedKVCache(budget=s.budget, sinks=s.sinks, recent=s.recent,
                                     policy=s.policy, chunk_size=s.chunk_size)
        self.gen = generator

    def held(self) -> int:
        return len(self.blocks) - self.freed


def _schedule(req, n, window, free, kv_cache, side):
    """vLLM's allocate_slots for ``n`` new tokens: first free the blocks the window skipped
    (remove_skipped_blocks with ``num_computed_tokens = L``), then allocate the missing ones."""
    skipped = max(0, req.L - window + 1) // BS
    while req.freed < min(skipped, len(req.blocks)):
        b = req.blocks[req.freed]
        kv_cache[b] = float("nan")
        side[0][b] = float("nan")
        side[1][b] = 10**9
        free.append(b)
        req.freed += 1
    while len(req.blocks) * BS < req.L + n:
        req.blocks.append(free.pop(0))


@pytest.mark.parametrize("policy", ["weightedkv", "h2o", "streaming"])
def test_backend_equals_weightedkvcache(plugin_env, monkeypatch, policy):
    text = PLUGIN + f",policy={policy}"
    monkeypatch.setenv(settings.ENV, text)
    s = settings.parse(text)
    torch.manual_seed(0)
    scale = D ** -0.5
    impl = _impl(scale)
    kv_cache = torch.randn(NUM_BLOCKS, H, BS, 2 * D)
    side = impl._side_tensors(kv_cache)
    free = list(range(1, NUM_BLOCKS))  # block 0 is vLLM's null block
    reqs = [_Request(s, None), _Request(s, None)]
    # Tokens per step for each request: prefills of several chunks (and a 1-token last chunk),
    # multi-token steps (chunked prefill), then decode; the second request starts later.
    plan = [(45, 0), (1, 17), (1, 1), (3, 1), (1, 33), (20, 1)] + [(1, 1)] * 40
    max_held = 0
    for n0, n1 in plan:
        rows = [(r, n) for r, n in zip(reqs, (n0, n1)) if n]
        for r, n in rows:
            _schedule(r, n, s.window, free, kv_cache, side)
        T = sum(n for _, n in rows)
        q = torch.randn(T, H * G, D)
        k = torch.randn(T, H, D)
        v = torch.randn(T, H, D)
        qsl = [0]
        for _, n in rows:
            qsl.append(qsl[-1] + n)
        width = max(len(r.blocks) for r, _ in rows)
        table = torch.zeros(len(rows), width, dtype=torch.int32)
        for i, (r, _) in enumerate(rows):
            table[i, :len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
        seq_lens = [r.L + n for r, n in rows]
        meta = backend.WeightedKVMetadata(num_actual_tokens=T, query_start_loc=qsl,
                                          seq_lens=seq_lens, block_table=table)
        out = torch.full((T, H * G, D), float("nan"))
        impl.forward(None, q, k, v, kv_cache, meta, out)
        for i, (r, n) in enumerate(rows):
            a, b = qsl[i], qsl[i + 1]
            keys, values = r.cache.update(k[a:b].transpose(0, 1)[None],
                                          v[a:b].transpose(0, 1)[None], 0)
            want, _ = weightedkv_attention_forward(None, q[a:b].transpose(0, 1)[None], keys,
                                                   values, None, scaling=scale)
            assert torch.equal(out[a:b], want[0]), (policy, r.L, n)
            r.L += n
            max_held = max(max_held, r.held())
            # vLLM's bound for a sliding-window request (SlidingWindowSpec.
            # max_admission_blocks_per_request with n tokens in flight)
            assert r.held() <= math.ceil((s.window - 1 + n) / BS) + 1
    assert reqs[0].L > 3 * s.capacity  # the window slid far past the first blocks
    assert max_held < reqs[0].L // BS


def test_customize_spec_bounds_the_layer(plugin_env):
    spec = FullAttentionSpec(block_size=16, num_kv_heads=H, head_size=D, dtype=torch.float32)
    got = backend.WeightedKVAttentionBackend.customize_spec(spec)
    assert type(got) is SlidingWindowSpec
    assert got.sliding_window == plugin_env.window == 24 + 8 + 1
    assert (got.block_size, got.num_kv_heads, got.head_size, got.dtype) == \
        (16, H, D, torch.float32)
    assert got.page_size_bytes == spec.page_size_bytes
    # per request at most window - 1 + in-flight tokens, whatever max_model_len
    assert got.max_admission_blocks_per_request(1, 100_000) == math.ceil(33 / 16) + 1


def test_unsupported_features_are_named(plugin_env):
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        backend.WeightedKVAttentionImpl(num_heads=4, head_size=D, scale=1.0, num_kv_heads=H,
                                        alibi_slopes=[1.0] * 4, sliding_window=None,
                                        kv_cache_dtype="auto")
    with pytest.raises(NotImplementedError, match="kv_cache_dtype='fp8'"):
        backend.WeightedKVAttentionImpl(num_heads=4, head_size=D, scale=1.0, num_kv_heads=H,
                                        alibi_slopes=None, sliding_window=None,
                                        kv_cache_dtype="fp8")
    spec = SlidingWindowSpec(block_size=16, num_kv_heads=H, head_size=D, dtype=torch.float32,
                             sliding_window=4096)
    with pytest.raises(NotImplementedError, match="sliding window of 4096"):
        backend.WeightedKVAttentionBackend.customize_spec(spec)


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("weightedkv") == "weightedkv_ext.vllm:register", \
        "reinstall the package into this venv: bash scripts/setup_vllm.sh"


def test_register_replaces_the_cpu_backend(plugin_env):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import weightedkv_ext.vllm as plugin

    plugin.register()
    assert AttentionBackendEnum.CPU_ATTN.get_class() is backend.WeightedKVAttentionBackend
    assert AttentionBackendEnum[backend.NAME].get_class() is backend.WeightedKVAttentionBackend
