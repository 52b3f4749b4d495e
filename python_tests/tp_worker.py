"""Tensor-parallel check, one process per rank (run by python_tests/test_distributed_tp.py):

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 python_tests/tp_worker.py --out /tmp/tp_out

Every rank builds the same tiny random Llama (seeded), saves it to a folder of its own, loads it
again with transformers' tensor parallelism (``DistributedConfig(tp_plan="auto")``, gloo on CPU)
and, for each config (GQA 4 query / 2 KV heads, MHA 4 / 4), each policy, without and with left
padding, runs greedy ``generate()`` with a ``WeightedKVCache`` on the sharded model and on the
unsharded one (the single-process run). It writes ``rank<r>.json`` with the tokens, logits
difference, cache bytes and head layouts; the test asserts on them. ``--device cuda`` (with
``--backend nccl``) runs the same on GPUs (scripts/gpu_multi.sh); ``--smollm2`` runs the embedded
SmolLM2-135M instead (9 query / 3 KV heads: ``--nproc-per-node 3``; ~9 minutes on 2 busy cores);
``--cache-backend reference`` uses the pure-PyTorch ops.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

CONFIGS = {"gqa": dict(num_attention_heads=4, num_key_value_heads=2),
           "mha": dict(num_attention_heads=4, num_key_value_heads=4)}
# budget < prompt: compression in every prefill chunk (chunk_size 8) and every decode step.
CACHE = dict(budget=16, sinks=2, recent=4, chunk_size=8)
PROMPT_LENGTHS = {False: (40, 40), True: (40, 27)}  # padded=True: row 1 is left-padded by 13
NEW_TOKENS = 12
VOCAB, PAD = 128, 0


def tiny_llama(name: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, head_dim=16, max_position_embeddings=256,
                      initializer_range=0.1, pad_token_id=PAD,
                      tie_word_embeddings=False, **CONFIGS[name])
    return LlamaForCausalLM(cfg).eval()


def prompts(padded: bool, device):
    g = torch.Generator().manual_seed(1)
    lengths = PROMPT_LENGTHS[padded]
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids.to(device), mask.to(device)


def generate(model, policy, ids, mask, backend="ops", cache_kw=CACHE, new_tokens=NEW_TOKENS,
             pad=PAD):
    from weightedkv_ext import WeightedKVCache
    kw = dict(cache_kw, backend=backend)
    if policy == "full":
        kw["budget"] = None
    cache = WeightedKVCache(policy=policy, **kw)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **cache.as_kwargs(),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad, output_logits=True,
                             return_dict_in_generate=True)
    logits = torch.stack(out.logits, 1).float().cpu()  # [B, new, vocab]
    return out.sequences[:, ids.shape[1]:].cpu(), logits, cache


def tiny_specs(tmp):
    specs = []
    for name in CONFIGS:
        folder = Path(tmp) / name
        tiny_llama(name).save_pretrained(folder)
        specs.append(dict(name=name, folder=folder, model=lambda name=name: tiny_llama(name),
                          prompts=lambda padded: prompts(padded, "cpu"), cache=CACHE,
                          new_tokens=NEW_TOKENS, pad=PAD))
    return specs


SMOLLM2_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps "
    "as his father had taught him. There were one hundred and twelve of them, worn smooth in the "
    "middle by a century of boots. At the top he trimmed the wick, polished the great lens with a "
    "soft cloth, and watched the fishing boats come home across the bay. Some nights the fog "
    "rolled in so thick that he could not see the rocks below, and on those nights he sounded "
    "the horn every thirty seconds until dawn. The villagers said they could set their clocks by "
    "it. In the winter storms the waves broke over the gallery and the whole tower hummed like a "
    "struck bell. He kept a logbook of every ship that passed, its name, its flag and the hour, "
    "and in forty years he had never missed a night. When the engineers came to install the "
    "automatic lamp, they asked him what he would do with his evenings now. He thought about it "
    "for a long time before he answered.")
SMOLLM2_CACHE = dict(budget=64, sinks=4, recent=28, chunk_size=32)


def smollm2_specs(folder: Path):
    """SmolLM2-135M-Instruct (offline, GGUF de-quantised to fp32), converted once by rank 0 to a
    safetensors folder that from_pretrained can shard (reused when it exists); two prompts of
    198 and 97 tokens, budget 64. Call after the process group exists."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    if dist.get_rank() == 0 and not (folder / "config.json").exists():
        from weightedkv_ext.models import load_smollm2
        model, tok = load_smollm2()
        cfg = model.config
        if hasattr(cfg, "quantization_config"):  # the GGUF-loaded model cannot be saved as is
            del cfg.quantization_config
        plain = LlamaForCausalLM(cfg)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(folder)
        tok.save_pretrained(folder)
    dist.barrier()
    tok = AutoTokenizer.from_pretrained(folder)
    words = SMOLLM2_TEXT.split()
    texts = [SMOLLM2_TEXT, " ".join(words[:len(words) // 2])]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def make_prompts(padded):
        batch = tok(texts if padded else texts[:1] * 2, return_tensors="pt", padding=True,
                    padding_side="left")
        return batch.input_ids, batch.attention_mask
    return [dict(name="smollm2", folder=folder,
                 model=lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                 prompts=make_prompts, cache=SMOLLM2_CACHE, new_tokens=16, pad=pad)]


def dtensor_head_offset(weight, head_dim: int) -> int:
    """Which global rows a colwise-sharded projection holds, found from the full weight (public
    DTensor API: full_tensor(), a collective every rank runs): offset in heads."""
    local, full = weight.to_local(), weight.full_tensor()
    for start in range(0, full.shape[0] - local.shape[0] + 1, head_dim):
        if torch.equal(full[start:start + local.shape[0]], local):
            return start // head_dim
    return -1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="folder for rank<r>.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--policies", default=None, help="comma-separated (default: all)")
    ap.add_argument("--cache-backend", default="ops", help="WeightedKVCache(backend=...)")
    ap.add_argument("--smollm2", action="store_true",
                    help="the embedded SmolLM2-135M (9 query / 3 KV heads: --nproc-per-node 3) "
                         "instead of the tiny random models")
    args = ap.parse_args()
    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    import weightedkv_ext
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from weightedkv_ext import distributed as wdist

    policies = args.policies.split(",") if args.policies else list(weightedkv_ext.POLICIES)
    result = dict(rank=rank, world=world, cases=[], layouts={})
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        # Saved before the process group exists: under torch.distributed save_pretrained writes on
        # rank 0 only, and each rank loads its own copy.
        specs = None if args.smollm2 else tiny_specs(tmp)
        dist.init_process_group(args.backend)
        if args.smollm2:
            specs = smollm2_specs(Path(args.out) / "smollm2_model")
        for spec in specs:
            name, folder = spec["name"], spec["folder"]
            ref = weightedkv_ext.enable(spec["model"]().to(device).eval())
            # transformers places the shards on the accelerator of LOCAL_RANK if there is one
            # (hide GPUs with CUDA_VISIBLE_DEVICES= for a CPU run) and on cpu otherwise.
            tp = AutoModelForCausalLM.from_pretrained(
                folder, distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.float32)
            assert tp.device.type == device.type, (tp.device, device)
            tp = weightedkv_ext.enable(tp.eval())
            wdist.check_model(tp)
            attn = [layer.self_attn for layer in tp.model.layers]
            head_dim = attn[0].head_dim
            layouts = []
            for a in attn:
                q_local = a.q_proj.weight.to_local().shape[0] // head_dim
                kv_local = a.k_proj.weight.to_local().shape[0] // head_dim
                lay = wdist.tp_layout(a, q_local, kv_local)
                layouts.append(dict(
                    tp_rank=lay.tp_rank, tp_size=lay.tp_size, local_q=lay.local_q_heads,
                    local_kv=lay.local_kv_heads, global_q=lay.global_q_heads,
                    global_kv=lay.global_kv_heads, kv_head_offset=lay.kv_head_offset,
                    q_head_offset=lay.q_head_offset,
                    dtensor_kv_offset=dtensor_head_offset(a.k_proj.weight, head_dim),
                    dtensor_q_offset=dtensor_head_offset(a.q_proj.weight, head_dim)))
            result["layouts"][name] = layouts
            for padded in (False, True):
                ids, mask = (t.to(device) for t in spec["prompts"](padded))
                for policy in policies:
                    case = dict(config=name, padded=padded, policy=policy)
                    gen = dict(backend=args.cache_backend, cache_kw=spec["cache"],
                               new_tokens=spec["new_tokens"], pad=spec["pad"])
                    try:
                        tok_ref, log_ref, c_ref = generate(ref, policy, ids, mask, **gen)
                        tok_tp, log_tp, c_tp = generate(tp, policy, ids, mask, **gen)
                        case.update(
                            ref_tokens=tok_ref.tolist(), tp_tokens=tok_tp.tolist(),
                            max_logit_diff=float((log_ref - log_tp).abs().max()),
                            ref_kv_bytes=c_ref.kv_bytes_held(), tp_kv_bytes=c_tp.kv_bytes_held(),
                            ref_memory_bytes=c_ref.memory_bytes(),
                            tp_memory_bytes=c_tp.memory_bytes(),
                            ref_held_shape=list(c_ref.held_tokens().shape),
                            tp_held_shape=list(c_tp.held_tokens().shape),
                            tp_held_max=int(c_tp.held_tokens().max()),
                            ref_held_max=int(c_ref.held_tokens().max()))
                    except Exception as e:  # recorded, so one failing case does not hide the rest
                        case["error"] = f"{type(e).__name__}: {e}"
                    result["cases"].append(case)
            del tp, ref
    result["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    if rank == 0:
        ok = sum(c.get("ref_tokens") == c.get("tp_tokens") for c in result["cases"])
        print(f"tp_worker: {ok}/{len(result['cases'])} cases with tokens equal to the "
              f"single-process run on rank 0 ({result['seconds']:.1f} s)")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
