#!/usr/bin/env bash
# Installs everything into .venv and runs lint, type checks and the whole test-suite
# (slow real-weights tests on SmolLM2-135M-Instruct included).
set -euo pipefail
source "$(dirname "$0")/install.sh" dev
ruff check mixkv tests
ruff format --check mixkv tests
mypy
python -m pytest -q
