#!/usr/bin/env bash
# The one-command GPU check: the device tests on CUDA, `mixkv bench` on Qwen2.5-0.5B's shape in
# bfloat16 at 8k-32k tokens, and short Qwen and tiny-VLM evaluation slices; under 10 minutes on one
# modern GPU. Writes OUT/report.md (default gpu_check_out) and exits non-zero when anything failed.
# Without CUDA it runs a reduced form on the CPU (about a minute). Run it in the environment that
# scripts/test.sh builds (.venv: the dev extra, with pytest and the Qwen weights):
#   bash scripts/gpu_check.sh [OUT] [--form auto|gpu|cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m mixkv.benchmarks.gpu_check "$@"
