#!/usr/bin/env bash
# Installs everything into .venv and runs the image demo: the tiny VLM trained in this repository
# (frozen Qwen2.5-Coder-0.5B-Instruct + a small vision encoder) answers a question about a picture
# with the full cache and under SnapKV, AdaKV and MixKV, and writes a heat map of the image tokens
# each press kept (options are passed to `mixkv demo`; `--model smollm2` gives the text demo).
set -euo pipefail
source "$(dirname "$0")/install.sh" eval,qwen
mixkv demo --model tiny-vlm "$@"
