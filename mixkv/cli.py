"""``mixkv`` command line: ``mixkv demo | eval | compare | bench | calibrate | presses | lm-eval | lmms-eval ...``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("mixkv.demo", "full cache vs SnapKV vs AdaKV vs MixKV on the embedded SmolLM2 model"),
    "eval": ("mixkv.eval.cli", "answer quality under compression: methods x budgets x tasks"),
    "compare": ("mixkv.eval.compare_runs", "two eval runs (e.g. float32 vs bfloat16) on the same examples"),
    "fidelity": ("mixkv.eval.fidelity", "top-1 agreement and KL vs the full cache on natural text"),
    "bench": ("mixkv.bench", "speed and memory of every method"),
    "calibrate": ("mixkv.calibration", "per-head redundancy / visual-head statistics for a model"),
    "presses": ("mixkv.presses.registry", "every method name, its press, parameters and defaults"),
    "lm-eval": (
        "mixkv.harnesses.lm_eval_model",
        "lm-evaluation-harness with model type `mixkv` (extra lm-eval)",
    ),
    "lmms-eval": ("mixkv.harnesses.lmms_eval_model", "lmms-eval with model type `mixkv` (extra lmms-eval)"),
}


def _usage() -> str:
    lines = ["usage: mixkv COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
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
        module = importlib.import_module(COMMANDS[command][0])
    except ImportError as exc:  # an optional extra that is not installed
        print(f"mixkv {command}: {exc}", file=sys.stderr)
        return 2
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
