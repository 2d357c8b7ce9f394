#!/usr/bin/env bash
# Installs everything into .venv and runs lint, type checks and the whole test-suite
# (slow real-weights tests on SmolLM2-135M-Instruct included), then the core tests again on the oldest
# supported transformers, then the harness integrations (extras lm-eval and lmms-eval) offline.
set -euo pipefail
source "$(dirname "$0")/install.sh" dev
ruff check mixkv tests
ruff format --check mixkv tests
mypy
# Two workers with one thread each: the suite is mostly small models, where two single-threaded
# processes beat one two-threaded one; worksteal evens out the long real-weights files.
OMP_NUM_THREADS=1 python -m pytest -q -n 2 --dist worksteal

# The oldest supported transformers (5.2): the core and every model family again.
python3 -m venv .venv-oldest
.venv-oldest/bin/python -m pip install -q torch==2.13.0
# kvpress 0.5 (which needs transformers < 5.3) joins it, so the kvpress side-by-side is checked too.
.venv-oldest/bin/python -m pip install -q -c <(echo torch==2.13.0) "transformers==5.2.0" "kvpress==0.5.5" \
    numpy pillow pytest pytest-xdist safetensors
.venv-oldest/bin/python -m pip install -q --no-deps -e .
OMP_NUM_THREADS=1 .venv-oldest/bin/python -m pytest -q -n 2 --dist worksteal tests/test_press_api.py tests/test_press_families.py \
    tests/test_end_to_end_reference.py tests/test_cache_layers.py tests/test_families.py tests/test_calibration.py \
    tests/test_replay.py tests/test_batched_decoding.py tests/test_attention_scorers.py tests/test_kvpress_scorer_reference.py \
    tests/test_kvpress_scorers.py tests/test_registry.py tests/test_kvzip.py tests/test_kvzip_kvpress_reference.py \
    tests/test_mm_runner.py tests/test_mm_batched_decoding.py \
    tests/test_models.py::test_a_vlm_checkpoint_saved_without_the_vision_model_level_loads_every_weight

# The harness integrations in their own venv: lm-evaluation-harness and lmms-eval bring heavy
# dependencies that must not shape the dev environment. PyPI's torchvision (an lmms-eval dependency)
# is a CUDA build that cannot load beside the CPU torch wheel, and transformers would import it and
# fail: it is removed when it does not import (mixkv's harness models do not use it).
python3 -m venv .venv-harnesses
.venv-harnesses/bin/python -m pip install -q torch==2.13.0
.venv-harnesses/bin/python -m pip install -q -c <(echo torch==2.13.0) -e ".[lm-eval,lmms-eval]" pytest
if ! .venv-harnesses/bin/python -c "import torchvision" 2>/dev/null; then
    .venv-harnesses/bin/python -m pip uninstall -q -y torchvision
fi
HF_DATASETS_OFFLINE=1 timeout 1200 .venv-harnesses/bin/python -m pytest -q \
    tests/test_lm_eval_harness.py tests/test_lmms_eval_harness.py
