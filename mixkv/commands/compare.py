"""``mixkv compare RUN_A RUN_B``: two eval runs on the same examples, paired differences with intervals."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixkv.commands.parsing import split_list
from mixkv.eval.compare_runs import compare_runs


def main(argv: list[str] | None = None) -> int:
    """``mixkv compare RUN_A RUN_B [--methods ...] [--out FILE]``."""
    parser = argparse.ArgumentParser(
        prog="mixkv compare",
        description=(
            "Compare two runs of `mixkv eval` (their --out directories) on the same examples: per method "
            "and budget, B - A with a paired-bootstrap 95% CI, wins/ties/losses and an exact sign test. "
            "E.g. a float32 run against a bfloat16 run, or query-aware against query-agnostic."
        ),
    )
    parser.add_argument("run_a", type=Path, help="output directory of the first run (A)")
    parser.add_argument("run_b", type=Path, help="output directory of the second run (B)")
    parser.add_argument("--methods", nargs="+", help="only these methods (comma or space separated)")
    parser.add_argument("--out", type=Path, help="also write the Markdown to this file")
    args = parser.parse_args(argv)
    methods = None
    if args.methods:
        methods = split_list(args.methods)
    try:
        lines = compare_runs(args.run_a, args.run_b, methods=methods)
    except ValueError as exc:
        print(f"mixkv compare: {exc}", file=sys.stderr)
        return 2
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0
