#!/usr/bin/env bash
# Installs everything into .venv and runs the demo: full cache vs SnapKV vs AdaKV vs MixKV on a long
# document, on the embedded SmolLM2-135M-Instruct (options are passed to `mixkv demo`).
set -euo pipefail
source "$(dirname "$0")/install.sh" eval
mixkv demo "$@"
