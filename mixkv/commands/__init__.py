"""The ``mixkv`` command line: one module per command in this package (``mixkv demo | eval | ...``)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": (
        "demo",
        "full cache vs SnapKV vs AdaKV vs MixKV on the embedded SmolLM2 model (or the tiny VLM)",
    ),
    "eval": ("eval", "answer quality under compression: methods x budgets x tasks"),
    "compare": ("compare", "two eval runs (e.g. float32 vs bfloat16) on the same examples"),
    "leaderboard": (
        "leaderboard",
        "every method of eval grids ranked per budget against the leader, with intervals",
    ),
    "fidelity": ("fidelity", "top-1 agreement and KL vs the full cache on natural text"),
    "bench": ("bench", "speed and memory of every method"),
    "bench-serving": ("bench_serving", "a request stream at a fixed cache size: full cache vs presses"),
    "calibrate": ("calibrate", "per-head redundancy / visual-head statistics for a model"),
    "presses": ("presses", "every method name, its press, parameters and defaults"),
    "serve": ("serve", "OpenAI-compatible chat server with a press over continuous batching (extra serve)"),
    "lm-eval": ("lm_eval", "lm-evaluation-harness with model type `mixkv` (extra lm-eval)"),
    "lmms-eval": ("lmms_eval", "lmms-eval with model type `mixkv` (extra lmms-eval)"),
    "train-tiny-vlm": ("train_tiny_vlm", "retrain the tiny VLM's vision encoder (about 50 min on 2 cores)"),
}


def _usage() -> str:
    lines = ["usage: mixkv COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<15} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines.append("\n`mixkv COMMAND --help` describes a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"mixkv: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"{__name__}.{COMMANDS[command][0]}")
    except ImportError as exc:  # an optional extra that is not installed
        print(f"mixkv {command}: {exc}", file=sys.stderr)
        return 2
    return int(module.main(rest))
