#!/usr/bin/env bash
# Installs everything into .venv and runs the image demo: a question about a held-out test image,
# answered by the tiny VLM trained in this repository (vision encoder trained here + the frozen
# Qwen2.5-Coder-0.5B-Instruct) with the full cache and with SnapKV, AdaKV and MixKV at budgets
# 32/64/128, and a heat map of the image tokens each press kept (mixkv_demo.png). Options are passed
# to `mixkv demo` (e.g. --family chart, --index 3). The text demo: `mixkv demo` (SmolLM2-135M).
set -euo pipefail
source "$(dirname "$0")/install.sh" "eval,qwen"
mixkv demo --model tiny-vlm "$@"
