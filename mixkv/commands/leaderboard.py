"""``mixkv leaderboard TITLE=RUN ...``: every method of one or more eval grids ranked at each budget."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixkv.eval.leaderboard_tables import write_leaderboard


def main(argv: list[str] | None = None) -> int:
    """``mixkv leaderboard TITLE=RUN [TITLE=RUN ...] --out DIR [--exclude M,...] [--no-plots]``."""
    parser = argparse.ArgumentParser(
        prog="mixkv leaderboard",
        description=(
            "Rank every method of one or more `mixkv eval` grids at each budget: task-average score with a "
            "95% interval, KV kept, and each method against the budget's leader on the same examples "
            "(paired bootstrap; 'level' where the interval includes 0). Reads only examples.csv, so "
            "published grids rebuild it. Writes DIR/leaderboard.md and a plot of score against KV kept "
            "per grid."
        ),
    )
    parser.add_argument(
        "grids",
        nargs="+",
        metavar="TITLE=RUN",
        help="a grid's title and its examples.csv or `mixkv eval --out` directory",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for leaderboard.md and the plots")
    parser.add_argument(
        "--exclude",
        default="",
        metavar="METHOD,...",
        help="methods to leave out of every grid, comma-separated (e.g. to rank the others among themselves)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write the Markdown only")
    args = parser.parse_args(argv)
    grids: dict[str, Path] = {}
    for item in args.grids:
        title, sep, run = item.partition("=")
        if not sep or not title or not run:
            print(
                f"mixkv leaderboard: {item!r} is not TITLE=RUN (e.g. 'Qwen 2k=docs/results/qwen-2k/query_aware')",
                file=sys.stderr,
            )
            return 2
        grids[title] = Path(run)
    try:
        exclude = [m.strip() for m in args.exclude.split(",") if m.strip()]
        path = write_leaderboard(grids, args.out, plots=not args.no_plots, exclude=exclude)
    except ValueError as exc:
        print(f"mixkv leaderboard: {exc}", file=sys.stderr)
        return 2
    print(path.read_text(encoding="utf-8"))
    return 0
