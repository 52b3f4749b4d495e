#!/usr/bin/env bash
# Tests of the vLLM plugin (weightedkv_ext.vllm) in its own environment (.venv-vllm, made by
# scripts/setup_vllm.sh, which this runs first: a re-run only rebuilds what changed).
# The tests import the copy of weightedkv_ext installed in that venv (built against its torch),
# so pytest runs from outside the work tree.
#   bash scripts/test_vllm.sh            fast tests (no model, about a minute)
#   bash scripts/test_vllm.sh --slow     also the end-to-end generations (SmolLM2 in vLLM, minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VLLM_VENV:-.venv-vllm}
bash scripts/setup_vllm.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
marks=(-m "not slow and not long")
if [ "${1:-}" = "--slow" ]; then marks=(-m "not long"); shift; fi
cd /
"$ROOT/$VENV/bin/python" -m pytest -p no:cacheprovider -c "$ROOT/pyproject.toml" \
  --rootdir "$ROOT" "${marks[@]}" "$ROOT"/python_tests/test_vllm*.py "$@"
