#!/usr/bin/env bash
# Installs everything into .venv and runs lint, type checks and the whole test-suite
# (slow real-weights tests on SmolLM2-135M-Instruct included), then the core tests again on the oldest
# supported transformers.
set -euo pipefail
source "$(dirname "$0")/install.sh" dev
ruff check mixkv tests
ruff format --check mixkv tests
mypy
python -m pytest -q

# The oldest supported transformers (5.2): the core and every model family again.
python3 -m venv .venv-oldest
.venv-oldest/bin/python -m pip install -q torch==2.13.0
.venv-oldest/bin/python -m pip install -q "transformers==5.2.0" numpy pillow pytest safetensors
.venv-oldest/bin/python -m pip install -q --no-deps -e .
.venv-oldest/bin/python -m pytest -q tests/test_press_api.py tests/test_press_families.py \
    tests/test_end_to_end_reference.py tests/test_cache_layers.py tests/test_families.py tests/test_calibration.py
