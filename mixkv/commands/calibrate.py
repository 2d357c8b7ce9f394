"""``mixkv calibrate MODEL_DIR --prompts FILE --out FILE``: measure head statistics on your prompts."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixkv.integration.calibration import calibrate, encode_prompt, read_prompts
from mixkv.model_loading import load_model


def main(argv: list[str] | None = None) -> int:
    """``mixkv calibrate MODEL_DIR --prompts FILE --out FILE``."""
    parser = argparse.ArgumentParser(prog="mixkv calibrate", description=__doc__)
    parser.add_argument("model", help="local model directory (LLM or VLM)")
    parser.add_argument(
        "--prompts",
        required=True,
        type=Path,
        help='text lines, or JSON lines {"text": ..., "images": [paths], "videos": [[frame paths] or path]}',
    )
    parser.add_argument("--out", required=True, type=Path, help="output .json or .safetensors")
    parser.add_argument("--window-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.out.suffix not in (".json", ".safetensors"):
        parser.error("--out must end in .json or .safetensors")
    prompts = read_prompts(args.prompts)
    model, processor = load_model(str(args.model), attn_implementation="eager")
    samples = [encode_prompt(processor, prompt, args.prompts.parent) for prompt in prompts]
    stats = calibrate(model, samples, window_size=args.window_size)
    stats.save(args.out)
    print(
        f"wrote {args.out}: {stats.num_samples} prompts, redundancy {tuple(stats.redundancy.shape)}", end=""
    )
    print(
        ""
        if stats.visual_head_scores is None
        else f", visual_head_scores {tuple(stats.visual_head_scores.shape)}"
    )
    summary = stats.redundancy_summary()
    if summary is not None:
        print(summary)
    return 0
