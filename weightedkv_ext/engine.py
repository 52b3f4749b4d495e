"""``KVEngine``: one layer's compressed KV cache and its attention, without transformers.

The engine owns the six slot tensors of docs/design.md (``keys``, ``values``, ``scores``,
``counts``, ``last``, ``slot_pos``) and the per-row position counters, and runs the whole step in
one call::

    engine = KVEngine(budget=256)              # one per attention layer
    out = engine.attend(q, k, v, scale=D ** -0.5)  # q [B, Hq, T, D], k/v [B, H, T, D] post-RoPE

``attend`` assigns each new token its absolute position (per row; padding = -1), cuts the call
into chunks of ``chunk_size`` real tokens per row, and per chunk runs append -> attention of the
chunk's queries over the held slots (statistics updated) -> compress to the budget. The
transformers integration (``cache.py``) wraps one engine per layer; plain PyTorch code calls it
directly (examples/plain_pytorch_decoder.py). This module never imports transformers.

Guarantees:

* every argument is checked before anything is written; after any exception (a bad argument, an
  op failing, out of memory, an interrupt) the engine is exactly as before the call;
* slots grow with the tokens actually held (amortised doubling up to ``budget + chunk_size``),
  so ``budget=10**9`` means "no compression" without allocating 10**9 slots;
* a cache filled under ``torch.inference_mode()`` keeps working outside it, and vice versa;
* inference only: a call that would need gradients (grad mode on and an input requiring grad)
  raises instead of returning outputs whose gradients would be wrong;
* under ``torch.autocast`` the inputs are cast to the autocast dtype, as sdpa does.
"""
from __future__ import annotations

import importlib
import math

import torch
from torch import Tensor

from . import policies
from . import prompt as _prompt_mode

BACKENDS = ("ops", "reference")


def _index(owner: str, name: str, value, minimum: int) -> int:
    return policies.as_int(owner, name, value, minimum)


_OP_MODULES: dict = {}  # backend name -> module, imported on first use


def _op_module(backend: str):
    """``weightedkv_ext.ops`` or ``.reference``, imported once: a plain dict lookup after that,
    which torch.compile traces without a graph break (``importlib`` is skipped by dynamo)."""
    mod = _OP_MODULES.get(backend)
    if mod is None:
        mod = _OP_MODULES[backend] = importlib.import_module(f".{backend}", __package__)
    return mod


class KVEngine:
    """One layer's compressed KV cache (see the module docstring).

    Args:
        budget: tokens held per (row, KV head) after each chunk (``policy="full"``: may be None).
        sinks: the first tokens never removed. recent: the newest tokens never removed
            (None: ``budget // 2 - sinks``). policy: one of ``policies.POLICIES``.
        chunk_size: real tokens per row processed per append -> attention -> compress step.
        cam_window, seed: CaM's merge window and random seed. group_reduce: how the G query heads
            of a KV head make one score (``mean``, ``sum``, ``max``).
        backend: ``"ops"`` (compiled kernels) or ``"reference"`` (pure PyTorch).
        window: sliding-window attention (0 = off): a query at position p sees positions
            ``> p - window``. Such a layer keeps exactly the window (StreamingLLM without sinks),
            whatever the policy, so its outputs are exact.
        softcap: logit soft-capping ``softcap * tanh(logit / softcap)`` (0 = off).
        sink_logits: learned attention sinks (GPT-OSS ``s_aux``), float ``[Hq]``, or None.
        name: how errors name this engine; reset_hint: what they tell the user to call.
        merge_target, merge_gate, merge_weights: weightedkv's merge rule (``policy="weightedkv"``
            only; defaults = the paper's): see ``ops.compress`` and csrc/kernels/merge.h.
        prompt_mode, prompt_window, prompt_pool, prompt_budget, prompt_merge, prompt_end: how the
            prompt is compressed (``"stream"``: like every token; ``"snapkv"``: held, then
            compressed once by the attention of its last ``prompt_window`` queries); see
            ``weightedkv_ext.prompt`` (the one table of these options and their defaults:
            ``prompt.OPTIONS``; any other keyword is a TypeError).
    """

    transactional = True  # snapshot before mutating, restore on any exception

    def __init__(self, budget, sinks=policies.DEFAULT_SINKS, recent=None, policy="weightedkv",
                 chunk_size=policies.OPTIONS["chunk_size"],
                 cam_window=policies.OPTIONS["cam_window"], seed=policies.OPTIONS["seed"],
                 group_reduce=policies.OPTIONS["group_reduce"],
                 backend=policies.OPTIONS["backend"], *,
                 window=0, softcap=0.0, sink_logits=None, head_offset=0, name="KVEngine",
                 reset_hint="engine.reset()",
                 merge_target=policies.MERGE_RULE_DEFAULT["merge_target"],
                 merge_gate=policies.MERGE_RULE_DEFAULT["merge_gate"],
                 merge_weights=policies.MERGE_RULE_DEFAULT["merge_weights"], **prompt_options):
        self.name, self.reset_hint = name, reset_hint
        self.budget, self.sinks, self.recent = policies.resolve(name, policy, budget, sinks,
                                                                recent)
        self.policy = policy
        self.merge_rule = policies.check_merge_rule(name, policy, merge_target, merge_gate,
                                                    merge_weights)
        self.merge_target, self.merge_gate, self.merge_weights = self.merge_rule.values()
        policies.check_choice(name, "backend", backend, BACKENDS)
        policies.check_choice(name, "group_reduce", group_reduce, policies.GROUP_REDUCES)
        self.chunk_size = _index(name, "chunk_size", chunk_size, 1)
        self.cam_window = _index(name, "cam_window", cam_window, 1)
        if isinstance(seed, bool) or not hasattr(seed, "__index__"):
            raise ValueError(f"{name}: seed must be an int, got seed={seed!r}")
        seed = seed.__index__()
        if not -(2 ** 63) <= seed <= policies.INT64_MAX:
            raise ValueError(f"{name}: seed must be an int in [-2**63, 2**63 - 1] (int64), "
                             f"got seed={seed!r}")
        self.seed, self.group_reduce, self.backend = seed, group_reduce, backend
        # Tensor parallelism: local KV head h is the model's head head_offset + h (CaM's draw).
        self.head_offset = _index(name, "head_offset", head_offset, 0)
        self.window = self._check_window(window)
        self.softcap = self._check_softcap(softcap)
        self.sink_logits = sink_logits
        cfg = self.prompt = _prompt_mode.resolve(
            name, policy, self.budget, self.sinks, self.recent,
            **_prompt_mode.options(name, prompt_options))
        (self.prompt_mode, self.prompt_window, self.prompt_pool, self.prompt_budget,
         self.prompt_merge, self.prompt_end) = (cfg.mode, cfg.window, cfg.pool, cfg.budget,
                                                cfg.merge, cfg.end)
        self._ops_override = None
        self.reset()

    @property
    def ops(self):
        """The op module: ``weightedkv_ext.ops`` or ``.reference`` (looked up, never stored, so
        the engine pickles and deep-copies)."""
        if self._ops_override is not None:
            return self._ops_override
        return _op_module(self.backend)

    @ops.setter
    def ops(self, module) -> None:
        self._ops_override = module

    def __repr__(self):
        feats = "".join(f", {k}={v}" for k, v in (("window", self.window),
                                                   ("softcap", self.softcap)) if v)
        return (f"KVEngine(budget={self.budget}, sinks={self.sinks}, recent={self.recent}, "
                f"policy={self.policy!r}, chunk_size={self.chunk_size}, "
                f"backend={self.backend!r}{feats}, held={self.capacity and self.max_held()})")

    # -- state ---------------------------------------------------------------------------------

    # merged [B, H, C] float32: the evicted tokens each slot has absorbed by merges (merge_stats)
    _TENSORS = ("keys", "values", "scores", "counts", "last", "slot_pos", "merged", "row_seen")

    def reset(self) -> None:
        """Forget every token (the storage is freed); the configuration is kept."""
        self.keys = self.values = self.scores = self.counts = self.last = None
        self.slot_pos = self.merged = self.row_seen = None
        self.seen = 0  # columns received (padding included)
        self.peak_block = 0  # largest attention block built: queries x slots per (row, head)
        self._window_fixed = False  # the window is part of the storage rule once tokens are held
        self._prompt = _prompt_mode.PromptState()  # the prompt mode's state (prompt.py)

    @property
    def is_initialized(self) -> bool:
        return self.keys is not None

    @property
    def state(self) -> tuple[Tensor, ...]:
        """The six slot tensors, in the argument order of the ops."""
        return self.keys, self.values, self.scores, self.counts, self.last, self.slot_pos

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def held_tokens(self) -> Tensor:
        """Held tokens per (row, KV head), int64 ``[B, H]`` (``[0, 0]`` before the first call)."""
        if not self.is_initialized:
            return torch.zeros(0, 0, dtype=torch.int64)
        return (self.slot_pos >= 0).sum(-1)

    def max_held(self) -> int:
        return int(self.held_tokens().max()) if self.is_initialized else 0

    def memory_bytes(self) -> int:
        """Bytes allocated: slot K/V, statistics, positions and the row counters."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size()
                   for t in (*self.state, self.merged, self.row_seen) if t is not None)

    def merge_stats(self) -> dict:
        """Over-merging, per (row, KV head): ``merged`` int64 ``[B, H, C]`` (evicted tokens each
        held slot has absorbed, transitively; 0 for empty slots), ``max`` int64 ``[B, H]``, and
        ``hist`` int64 ``[B, H, bins]``: held slots by absorbed count 0, 1, 2-3, 4-7, ... (bin
        ``i >= 1`` counts ``[2^(i-1), 2^i)``; ``bins`` = the bins needed by the largest count)."""
        if not self.is_initialized:
            z = torch.zeros(0, 0, dtype=torch.int64)
            return dict(merged=z[..., None], max=z, hist=z[..., None])
        held = self.slot_pos >= 0
        merged = self.merged if self.merged is not None else torch.zeros_like(self.scores)
        m = torch.where(held, merged, torch.zeros_like(merged)).round().long()
        bins = merge_bins(m)
        hist = torch.zeros(*m.shape[:2], int(bins.max()) + 1 if m.numel() else 1,
                           dtype=torch.int64, device=m.device)
        hist.scatter_add_(2, bins, held.long())
        return dict(merged=m, max=m.amax(-1) if m.shape[-1] else m.sum(-1), hist=hist)

    # -- the storage rule ------------------------------------------------------------------------

    def _compress_args(self):
        """(budget, sinks, recent, policy) of compress, or None when nothing is compressed."""
        if self.window:  # a sliding-window layer keeps exactly its window
            return self.window, 0, 0, "streaming"
        if self.policy == "full":
            return None
        if _prompt_mode.in_prompt(self):  # snapkv: the prompt is held (or kept to prompt_budget)
            return _prompt_mode.compress_args(self)
        return self.budget, self.sinks, self.recent, self.policy

    def _merge_kwargs(self, policy: str) -> dict:
        """compress's merge-rule options (the engine's for weightedkv) and the merged tensor."""
        rule = self.merge_rule if policy == "weightedkv" else policies.MERGE_RULE_DEFAULT
        if self.merged is None or self.merged.shape != self.scores.shape:
            # slots loaded from outside (the vLLM backend sets the six tensors): nothing merged yet
            self.merged = torch.zeros_like(self.scores)
        return dict(rule, merged=self.merged)

    def _limit(self) -> int | None:
        """Slots never needed beyond this (budget + chunk); None = unbounded (``full``)."""
        args = self._compress_args()
        return None if args is None else args[0] + self.chunk_size

    def _grown_capacity(self, n_new: int) -> int:
        """The capacity needed to append ``n_new`` more tokens per row (>= the current one)."""
        C, limit = self.capacity, self._limit()
        if C and C == limit:
            return C  # compress keeps <= budget held, so budget + chunk slots always suffice
        held = self.max_held() if C else 0
        need = held + n_new
        if need <= C:
            return C
        new = max(need, 2 * C, 2 * self.chunk_size)  # amortised doubling
        return new if limit is None else min(new, limit)

    # -- validation (nothing is written) ---------------------------------------------------------

    def _check_window(self, window) -> int:
        window = 0 if window is None else window
        return _index(self.name, "window", window, 0)

    def _check_softcap(self, softcap) -> float:
        softcap = 0.0 if softcap is None else softcap
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) \
                or not math.isfinite(softcap) or softcap < 0:
            raise ValueError(f"{self.name}: softcap must be a finite number >= 0 (0 = off), "
                             f"got softcap={softcap!r}")
        return float(softcap)

    def check_kv(self, key: Tensor, value: Tensor, names=("key", "value")) -> None:
        """Raise ValueError unless ``key``/``value`` fit this engine's storage (writes nothing)."""
        kn, vn = names
        for n, t in ((kn, key), (vn, value)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{self.name}: {n} must be a 4-D tensor [batch, kv_heads, "
                                 f"tokens, head_dim], got {n}={_describe(t)}")
            if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"{self.name}: {n} must be float32, float16 or bfloat16, got "
                                 f"{n} {t.dtype}")
        ks, vs = tuple(key.shape), tuple(value.shape)
        if vs[3] != ks[3]:
            raise ValueError(
                f"{self.name}: {vn} head_dim ({vs[3]}) differs from the {kn} head_dim ({ks[3]}); "
                "weightedkv needs one head_dim for keys and values (models whose value head "
                "dimension differs, e.g. MLA / DeepSeek-V3, are not supported)")
        if vs != ks:
            raise ValueError(f"{self.name}: {vn} must have the {kn} shape {ks}, got {vn} {vs}")
        if key.dtype != value.dtype or key.device != value.device:
            raise ValueError(
                f"{self.name}: {kn} and {vn} must share dtype and device, got {kn} {key.dtype} "
                f"on {key.device} and {vn} {value.dtype} on {value.device} (under autocast they "
                "are cast to the autocast dtype)")
        if ks[0] == 0 or ks[1] == 0 or ks[3] == 0:
            raise ValueError(f"{self.name}: {kn} must have batch, kv_heads and head_dim >= 1, "
                             f"got {kn} {ks}")
        if self.is_initialized:
            B, H, _, D = self.keys.shape
            if (ks[0], ks[1], ks[3]) != (B, H, D):
                what = ("another batch size" if ks[0] != B else
                        "another number of KV heads (another model)" if ks[1] != H else
                        "another head_dim (another model)")
                raise ValueError(
                    f"{self.name} holds batch={B}, kv_heads={H}, head_dim={D}, got {kn} {ks}: "
                    f"{what}; call {self.reset_hint} before reusing it")
            if key.dtype != self.keys.dtype or key.device != self.keys.device:
                raise ValueError(
                    f"{self.name} holds {self.keys.dtype} on {self.keys.device}, got {kn} "
                    f"{key.dtype} on {key.device}; call {self.reset_hint} before reusing it with "
                    "another dtype or device")

    def _check(self, caller, query, key, value, real, positions, window, softcap, sink_logits):
        """Every check of ``attend``; returns the (possibly cast) inputs. Writes nothing."""
        if not isinstance(query, Tensor) or query.dim() != 4:
            raise ValueError(f"{caller}: query must be a 4-D tensor [batch, heads, tokens, "
                             f"head_dim], got query={_describe(query)}")
        if torch.is_grad_enabled() and any(
                isinstance(t, Tensor) and t.requires_grad
                for t in (query, key, value, sink_logits)):
            raise RuntimeError(
                f"{caller}: weightedkv is inference only (the cache keeps no autograd graph, so "
                "gradients would be wrong); run the model under torch.no_grad() or "
                "torch.inference_mode(), or freeze it with model.requires_grad_(False)")
        device_type = query.device.type
        if torch.is_autocast_enabled(device_type):  # like sdpa: compute in the autocast dtype
            dtype = torch.get_autocast_dtype(device_type)
            query, key, value = (t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point()
                                 else t for t in (query, key, value))
        self.check_kv(key, value)
        B, H, T, D = key.shape
        shape = tuple(query.shape)
        if shape[0] != B:
            raise ValueError(f"{caller}: query must be [batch={B}, heads, {T} new tokens, "
                             f"head_dim={D}], got query {shape}")
        if shape[1] == 0 or shape[1] % H != 0:
            raise ValueError(f"{caller}: the number of query heads must be a positive multiple "
                             f"of the {H} KV heads of {self.name}, got query {shape}")
        if shape[3] != D:
            raise ValueError(f"{caller}: query head_dim must be {D} (the keys'), got query "
                             f"{shape}")
        if shape[2] != T:
            raise ValueError(f"{caller}: query must have {T} tokens (as many as the new keys), "
                             f"got query {shape}")
        if query.dtype != key.dtype or query.device != key.device:
            raise ValueError(f"{caller}: query must be {key.dtype} on {key.device} like the "
                             f"keys, got {query.dtype} on {query.device}")
        if real is not None and positions is not None:
            raise ValueError(f"{caller}: pass either real (a padding mask) or positions, "
                             "not both")
        if real is not None:
            if not isinstance(real, Tensor) or tuple(real.shape) != (B, T):
                raise ValueError(f"{caller}: padding mask has shape "
                                 f"{tuple(getattr(real, 'shape', ()))}, expected [{B}, {T}]")
            real = real.to(device=key.device, dtype=torch.bool)
        if positions is not None:
            if not isinstance(positions, Tensor) or tuple(positions.shape) != (B, T) \
                    or positions.dtype != torch.int64:
                raise ValueError(f"{caller}: positions must be an int64 tensor [{B}, {T}] "
                                 f"(-1 = padding), got positions={_describe(positions)}")
            positions = positions.to(key.device)
        window = self.window if window is None else self._check_window(window)
        if self._window_fixed and window != self.window:
            raise ValueError(f"{caller}: {self.name} was filled with window={self.window}, got "
                             f"window={window}; one engine serves one layer")
        softcap = self.softcap if softcap is None else self._check_softcap(softcap)
        sink_logits = self.sink_logits if sink_logits is None else sink_logits
        if sink_logits is not None:
            if not isinstance(sink_logits, Tensor) or tuple(sink_logits.shape) != (shape[1],):
                raise ValueError(f"{caller}: sink_logits (s_aux) must be a tensor [{shape[1]}] "
                                 f"(one logit per query head), got {_describe(sink_logits)}")
            sink_logits = sink_logits.detach().to(device=key.device, dtype=torch.float32)
        return query, key, value, real, positions, window, softcap, sink_logits

    # -- the step ----------------------------------------------------------------------------------

    def attend(self, query: Tensor, key: Tensor, value: Tensor, real: Tensor | None = None,
               positions: Tensor | None = None, scale: float | None = None, *, window=None,
               softcap=None, sink_logits=None, caller: str | None = None) -> Tensor:
        """Append the new tokens, attend, compress; returns ``out [B, Hq, T, D]``.

        query ``[B, Hq, T, D]``, key/value ``[B, H, T, D]`` (post-RoPE, Hq a multiple of H: query
        heads ``h*G .. h*G+G-1`` share KV head ``h``). ``real`` bool ``[B, T]`` (False = padding;
        positions then count real tokens per row) or ``positions`` int64 ``[B, T]`` (absolute,
        -1 = padding); neither: every token is real and follows the row's previous ones.
        ``scale``: logit scale (default ``D ** -0.5``). ``window``/``softcap``/``sink_logits``
        override the constructor's for this call. Padding outputs are zero.
        """
        caller = caller or f"{self.name}.attend"
        (query, key, value, real, positions, window, softcap,
         sink_logits) = self._check(caller, query, key, value, real, positions, window, softcap,
                                    sink_logits)
        B, Hq, T, D = query.shape
        scale = D ** -0.5 if scale is None else float(scale)
        feats = (window, softcap, sink_logits)
        with torch.no_grad():  # inference only (checked above): nothing to record
            saved = self._snapshot(appends_only=self._appends_only(window))
            try:
                self.window = window
                out = self._step(query, key, value, real, positions, scale, feats)
                if T > 1 and self.prompt.end == "first_forward" and _prompt_mode.in_prompt(self):
                    _prompt_mode.end(self)  # the prompt ends with the first multi-token call
            except BaseException:
                self._restore(saved)
                raise
        self._window_fixed = True
        return out

    def end_prompt(self) -> None:
        """End the prompt now (``prompt_mode="snapkv"``): compress it once to ``budget`` by the
        attention of its last ``prompt_window`` queries (weightedkv_ext/prompt.py). A no-op in
        ``"stream"`` mode or once ended; ``reset()`` starts a new prompt."""
        if not _prompt_mode.in_prompt(self):
            return
        with torch.no_grad():
            saved = self._snapshot()
            try:
                self._own_tensors()  # a prompt held under inference_mode, ended outside it
                _prompt_mode.end(self)
            except BaseException:
                self._restore(saved)
                raise

    def _appends_only(self, window) -> bool:
        """Whether a call with this ``window`` only appends (a full cache: nothing compressed,
        no sliding window, no prompt to end), so the tokens held before it are never moved."""
        return self.policy == "full" and not window and not self.window \
            and not _prompt_mode.in_prompt(self)

    def _snapshot(self, appends_only: bool = False):
        """The state to restore on an exception. The ops write in place, so the state tensors
        are copied, and copied back on restore even where a later chunk replaced them by grown
        ones (earlier chunks may have written them in place first). A call that only
        appends (``_appends_only``) writes keys and values into free slots alone, which hold zeros
        (slots are never freed without compression): those two, the bulk of the memory, are not
        copied but their newly written slots zeroed again on restore (a full-cache decode step
        would otherwise copy the whole cache)."""
        attrs = {n: getattr(self, n) for n in self._TENSORS}
        attrs.update(seen=self.seen, peak_block=self.peak_block, window=self.window,
                     _prompt=self._prompt)
        self._clones, self._zero_free = {}, ()
        if self.transactional and self.is_initialized:
            skip = ("keys", "values") if appends_only else ()
            self._clones = {n: t.clone() for n, t in attrs.items()
                            if isinstance(t, Tensor) and n not in skip}
            self._zero_free = skip
        return attrs

    def _restore(self, saved) -> None:
        clones = self._clones
        # Outside inference mode an inference tensor cannot have been written (the write would
        # have raised; _own_tensors replaced it by a copy first): it is kept as it is.
        frozen = not torch.is_inference_mode_enabled()
        for n in self._zero_free:  # slots free before the call (slot_pos -1) hold zeros again
            if not (frozen and saved[n].is_inference()):
                saved[n].masked_fill_((clones["slot_pos"] < 0)[..., None], 0)
        for n, v in saved.items():
            if n in clones and not (frozen and v.is_inference()):
                v.copy_(clones[n])  # written in place, maybe before a later chunk grew it
            setattr(self, n, v)
        self._clones, self._zero_free = {}, ()

    def _own_tensors(self) -> None:
        """Make the state writable in the current mode: tensors created under inference_mode
        cannot be written outside it, so they are copied once (as normal tensors) when needed."""
        if not self.is_initialized or torch.compiler.is_compiling() \
                or torch.is_inference_mode_enabled():
            # torch.compile cannot query inference mode (a graph break): a compiled step uses the
            # state as it is, so it must run in the mode the cache was filled in (or both outside).
            return
        for n in self._TENSORS:
            t = getattr(self, n)
            if t is not None and t.is_inference():
                setattr(self, n, t.clone())

    def _make_room(self, n_new: int, like: Tensor) -> None:
        """Allocate or grow the slots for ``n_new`` more tokens per row (new tensors: the old
        ones stay untouched, so a failure later in the call restores them as they were)."""
        C = self._grown_capacity(n_new)
        if C == self.capacity:
            return
        B, H, _, D = like.shape
        dev = like.device
        new = dict(
            keys=torch.zeros(B, H, C, D, dtype=like.dtype, device=dev),
            values=torch.zeros(B, H, C, D, dtype=like.dtype, device=dev),
            scores=torch.zeros(B, H, C, dtype=torch.float32, device=dev),
            counts=torch.zeros(B, H, C, dtype=torch.float32, device=dev),
            last=torch.zeros(B, H, C, dtype=torch.float32, device=dev),
            slot_pos=torch.full((B, H, C), -1, dtype=torch.int64, device=dev),
            merged=torch.zeros(B, H, C, dtype=torch.float32, device=dev),
        )
        if self.is_initialized:
            n = self.capacity
            for name, t in new.items():
                if getattr(self, name) is not None:  # merged may be absent (vLLM's slots)
                    t[:, :, :n].copy_(getattr(self, name))
        else:
            self.row_seen = torch.zeros(B, dtype=torch.int64, device=dev)
        for name, t in new.items():
            setattr(self, name, t)

    def _positions(self, real, positions, B, T, device) -> Tensor:
        """Absolute positions of the new tokens (-1 = padding); advances ``row_seen``."""
        if positions is not None:
            top = positions.max(1).values + 1
            self.row_seen = torch.maximum(self.row_seen, top)
            return positions
        if real is None:
            pos = self.row_seen[:, None] + torch.arange(T, device=device)[None, :]
            self.row_seen = self.row_seen + T
            return pos
        pos = self.row_seen[:, None] + real.long().cumsum(1) - 1
        self.row_seen = self.row_seen + real.long().sum(1)
        return pos.masked_fill(~real, -1)

    def _step(self, query, key, value, real, positions, scale, feats) -> Tensor:
        B, Hq, T, D = query.shape
        if not self.is_initialized:
            self._make_room(min(T, self.chunk_size), key)
        self._own_tensors()
        if positions is not None and bool((positions >= 0).all()):
            pass  # every token real: plain column chunks, like real=None
        elif positions is not None:
            real = positions >= 0
        pos = self._positions(real, positions, B, T, query.device)
        self.seen += T
        S = self.chunk_size
        if real is None:  # no padding: chunks are plain column slices
            outs = [self._chunk(query[:, :, s:s + S], key[:, :, s:s + S], value[:, :, s:s + S],
                                pos[:, s:s + S].contiguous(), scale, feats)
                    for s in range(0, T, S)]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        # Padding: per-row chunks of real tokens (_row_chunks); outputs are scattered back to
        # their columns, padding columns stay zero.
        out = query.new_zeros(B, Hq, T, D)
        for cols, qpos in _row_chunks(real, pos, S):
            o = self._chunk(_gather_tokens(query, cols), _gather_tokens(key, cols),
                            _gather_tokens(value, cols), qpos, scale, feats)
            out.scatter_(2, cols[:, None, :, None].expand_as(o), o)  # zeros where qpos == -1
        return out

    def _chunk(self, query, key, value, qpos, scale, feats) -> Tensor:
        """One chunk: append -> attention of its queries over the slots -> compress.

        query ``[B, Hq, w, D]``, key/value ``[B, H, w, D]``, qpos int64 ``[B, w]`` (-1 = padding)
        -> out ``[B, Hq, w, D]``.
        """
        self._make_room(query.shape[2], key)
        self.ops.append(*self.state, key, value, qpos)
        out = self._attention(query, qpos, scale, *feats)
        if _prompt_mode.in_prompt(self):  # keep the last queries for the prompt-end scores
            _prompt_mode.observe(self, query, qpos, scale, feats)
        args = self._compress_args()
        if args is not None:
            self.ops.compress(*self.state, *args, self.cam_window, self.seed,
                              head_offset=self.head_offset, **self._merge_kwargs(args[3]))
        return out

    def _attention(self, query, qpos, scale, window, softcap, sink_logits) -> Tensor:
        """Attention of the chunk's ``w`` queries over the held slots, statistics updated.

        The one place attention is computed, always by an op (docs/design.md): the fused
        ``decode_attention`` for one query, ``block_attention`` for a chunk. Neither writes the
        probabilities nor a float32 copy of the cache, so a chunk step's extra memory is the
        output alone. Window, softcap and sink logits are applied inside the ops. A query that
        sees no slot (padding) gets zero output and adds no statistics.
        """
        keys, values, scores, counts, last, slot_pos = self.state
        C = keys.shape[2]
        sinks = None
        if sink_logits is not None:  # the ops take float32 [Hq] on the cache's device
            sinks = sink_logits.detach().to(device=keys.device, dtype=torch.float32).contiguous()
        feats = dict(window=int(window or 0), softcap=float(softcap or 0.0), sinks=sinks)
        if query.shape[2] == 1:
            out = self.ops.decode_attention(query[:, :, 0], keys, values, slot_pos, qpos[:, 0],
                                            scores, counts, last, scale, self.group_reduce,
                                            **feats)[:, :, None]
            self.peak_block = max(self.peak_block, C)
            return out
        self.peak_block = max(self.peak_block, query.shape[2] * C)  # logical block, never stored
        return self.ops.block_attention(query, keys, values, slot_pos, qpos, scores, counts,
                                        last, scale, self.group_reduce, **feats)

    # -- batch reordering (beam search) ------------------------------------------------------------

    def index_batch(self, index: Tensor) -> None:
        """Keep rows ``index`` (int64 ``[B']``, repeats allowed): beam reorder / select."""
        if not self.is_initialized:
            return
        index = torch.as_tensor(index, dtype=torch.long).to(self.keys.device)
        for name in self._TENSORS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index).contiguous())
        _prompt_mode.index_batch(self, index)

    def reorder(self, beam_idx: Tensor) -> None:
        self.index_batch(beam_idx)

    def select(self, indices: Tensor) -> None:
        self.index_batch(indices)

    def repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.index_batch(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))


def merge_bins(m: Tensor) -> Tensor:
    """The ``merge_stats`` histogram bin of absorbed counts ``m`` (int64): 0 -> 0, and
    ``[2^(i-1), 2^i)`` -> i (1 -> 1, 2-3 -> 2, 4-7 -> 3, ...)."""
    return torch.where(m > 0, torch.floor(torch.log2(m.clamp(min=1).double())).long() + 1,
                       torch.zeros_like(m))


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)}, {x.dtype}"
    return f"{x!r:.80}"


def _row_chunks(real: Tensor, pos: Tensor, S: int):
    """Chunks of a padded call: yields ``(cols, qpos)``, int64 ``[B, w]`` each, ``w <= S``.

    Chunk ``k`` holds, for every row ``b``, the columns of row ``b``'s real tokens with in-call
    real index ``k*S .. k*S+S-1`` (any padding pattern), so a row is chunked exactly as the same
    sequence run alone. A row with fewer real tokens is filled with its padding columns, whose
    ``qpos`` (``pos`` gathered) is -1: never appended, never attended, no statistics.
    """
    order = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)
    n_real = int(real.sum(1).max())
    for s in range(0, n_real, S):
        cols = order[:, s:min(n_real, s + S)]
        yield cols, pos.gather(1, cols)


def _gather_tokens(x: Tensor, cols: Tensor) -> Tensor:
    """``x[b, :, cols[b, i]]``: ``x`` ``[B, H, T, D]``, ``cols`` ``[B, w]`` -> ``[B, H, w, D]``."""
    B, H, _, D = x.shape
    return x.gather(2, cols[:, None, :, None].expand(B, H, cols.shape[1], D))


__all__ = ["KVEngine", "BACKENDS"]
