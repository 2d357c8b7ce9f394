"""``mixkv train-tiny-vlm``: retrain the tiny VLM's vision encoder (about 50 minutes on 2 CPU cores)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixkv.tiny_vlm.model import VISION_WEIGHTS
from mixkv.tiny_vlm.train import train


def main(argv: list[str] | None = None) -> int:
    """``mixkv train-tiny-vlm [--out FILE] [--seed N]``."""
    parser = argparse.ArgumentParser(prog="mixkv train-tiny-vlm", description=__doc__)
    parser.add_argument("--out", type=Path, default=VISION_WEIGHTS, help="weights file (safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="checkpoint saved after phase --skip-phases")
    parser.add_argument("--skip-phases", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.init is None) != (args.skip_phases == 0):
        parser.error("--init and --skip-phases go together")
    train(args.out, seed=args.seed, init=args.init, skip_phases=args.skip_phases)
    return 0
