"""Command line for the evaluation grid (``mixkv eval ...``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _split(values: Sequence[str] | None) -> list[str]:
    """Accept both ``--x a b`` and ``--x a,b``."""
    out: list[str] = []
    for value in values or []:
        out.extend(part.strip() for part in value.split(",") if part.strip())
    return out


def _ints(values: Sequence[str] | None, flag: str) -> list[int]:
    try:
        return [int(v) for v in _split(values)]
    except ValueError as exc:
        raise ValueError(f"{flag} takes integers (e.g. {flag} 64,128), got {list(values or [])}") from exc


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``mixkv eval``."""
    from mixkv.eval.runner import METHODS
    from mixkv.eval.tasks import TASKS

    p = argparse.ArgumentParser(
        prog="mixkv eval",
        description=(
            "Run a resumable grid of KV-cache compression methods x budgets x long-context tasks "
            "x context lengths; writes one JSON per finished cell, results.md and PNG plots."
        ),
    )
    p.add_argument("--model", default=None, help="smollm2 (default), gemma3-270m, a model directory or .gguf")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["full,snapkv,adakv,mixkv-snapkv,mixkv-adakv"],
        help=f"comma or space separated; from: {', '.join(METHODS)}",
    )
    p.add_argument("--budgets", nargs="+", default=["64,128"], help="tokens per KV head, e.g. 64,128,256")
    p.add_argument(
        "--tasks", nargs="+", default=["niah_single_1,niah_single_2"], help=f"from: {', '.join(TASKS)}"
    )
    p.add_argument("--context-lengths", nargs="+", default=["1024"], help="context tokens, e.g. 1024,2048")
    p.add_argument("--n", type=int, default=5, help="examples per cell (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="mixkv_results", help="output directory (default ./mixkv_results)")
    p.add_argument("--protocol", choices=["query_agnostic", "query_aware"], default="query_agnostic")
    p.add_argument("--no-resume", action="store_true", help="recompute and overwrite finished cells")
    p.add_argument("--window-size", type=int, default=32, help="observation window (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the tasks' answer lengths")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``mixkv eval``.

    Parameters
    ----------
    argv
        Arguments (without the program name); default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success, 2 on invalid input (the message says what to change).
    """
    from mixkv.eval.runner import run_eval

    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run_eval(
            args.model,
            methods=_split(args.methods),
            budgets=_ints(args.budgets, "--budgets"),
            tasks=_split(args.tasks),
            context_lengths=_ints(args.context_lengths, "--context-lengths"),
            n=args.n,
            seed=args.seed,
            out_dir=args.out,
            protocol=args.protocol,
            resume=not args.no_resume,
            window_size=args.window_size,
            max_new_tokens=args.max_new_tokens,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"mixkv eval: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{len(result.computed)} cell(s) computed, {len(result.reused)} reused, "
        f"{len(result.recomputed)} recomputed (corrupt/stale), {len(result.skipped)} skipped."
    )
    for name, reason in result.skipped:
        print(f"  skipped {name}: {reason}")
    if result.table_path is not None:
        print(result.table_path.read_text(encoding="utf-8"))
        print(f"table: {result.table_path}")
    for path in result.plot_paths:
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
