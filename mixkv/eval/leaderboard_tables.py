"""A leaderboard of evaluation grids: every method ranked at each budget, with intervals, against the leader.

Input is the ``examples.csv`` a ``mixkv eval`` run writes (one row per method, budget, task and
example: score, KV fraction, timings, digests; :mod:`mixkv.eval.reporting`), so a leaderboard can
be rebuilt from published files alone. For each grid and budget:

* a method's **score** is the average over the grid's tasks of its mean example score (each task
  counts once), with a task-stratified 95% bootstrap interval
  (:func:`~mixkv.eval.stats.stratified_bootstrap_ci`); a method is ranked at a budget only when it
  holds, on every task of the grid, as many examples as the grid's most complete cell of that task
  (a run still being computed is listed below the table with how far it has got and its paired
  difference from the leader on the examples it holds, never ranked on fewer examples than the
  others);
* its **KV fraction** is the mean over its examples of the cache kept over the full cache
  (``kv_fraction``), so methods are compared at equal KV bytes where their budgets are equal;
* the **leader** is the method with the highest score; every other method is compared with it on
  the examples both hold (same task and ``example_sha1``): the difference in points with its
  paired-bootstrap 95% interval, and wins / ties / losses (:func:`~mixkv.eval.stats.paired_comparison`).
  A method whose interval includes 0 is *level with the leader*: the data do not separate them;
* its **prefill** is the mean ``prefill_seconds`` of its records (what its compression step adds
  to the shared prefill; see the grid's own documentation for what that column times).

The full cache and ``closed-book`` (no budget) are reference lines, never ranked. Resampling runs
over the examples in (task, digest) order, so the intervals do not depend on the order of the rows.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixkv.eval.reporting import EXAMPLE_COLUMNS
from mixkv.eval.stats import PairedComparison, paired_comparison, stratified_bootstrap_ci
from mixkv.eval.stats_tables import UNBUDGETED_METHODS

__all__ = [
    "GridExamples",
    "Standing",
    "Unfinished",
    "read_grid",
    "standings",
    "unfinished",
    "write_leaderboard",
]

#: (task, context length) of a cell: a context length is empty for multimodal tasks.
TaskKey = tuple[str, str]


@dataclass(frozen=True)
class ExampleRow:
    """One example of one cell: what a leaderboard needs of an ``examples.csv`` row."""

    example_sha1: str
    score: float
    kv_fraction: float
    prefill_seconds: float


#: A grid: per (method, budget; None for unbudgeted methods), per task, its examples in order.
GridExamples = dict[tuple[str, int | None], dict[TaskKey, list[ExampleRow]]]


@dataclass(frozen=True)
class Standing:
    """One method of a leaderboard at one budget.

    Attributes
    ----------
    method, budget
        The method and its budget (tokens kept per KV head; None for the full cache and
        ``closed-book``).
    n
        Examples over all tasks.
    score, low, high
        Task-average score and its 95% interval, in [0, 1].
    kv_fraction
        Mean fraction of the full cache's KV entries kept.
    prefill_seconds
        Mean prefill time per example (NaN where the records carry none).
    against_leader
        This method (B) against the leader at its budget (A) on their common examples; None for the
        leader itself and for the reference lines.
    """

    method: str
    budget: int | None
    n: int
    score: float
    low: float
    high: float
    kv_fraction: float
    prefill_seconds: float
    against_leader: PairedComparison | None = None

    @property
    def level_with_leader(self) -> bool:
        """The leader itself, or a method whose paired interval against the leader includes 0."""
        return self.against_leader is None or not self.against_leader.significant


def _float(text: str) -> float:
    return float(text) if text else math.nan


def read_grid(path: Path | str) -> GridExamples:
    """The examples of a grid from its ``examples.csv`` (or a directory holding one).

    Raises
    ------
    ValueError
        No such file, a file without the columns ``mixkv eval`` writes, or a score that is not a
        number (a corpus-level metric has no per-example score to rank on).
    """
    table = Path(path)
    if table.is_dir():
        table = table / "examples.csv"
    if not table.is_file():
        raise ValueError(
            f"No examples.csv at {path}: give the file or the directory `mixkv eval --out` wrote."
        )
    grid: GridExamples = {}
    with table.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        # the cell, the example, its score and KV fraction: the leading columns mixkv eval writes
        needed = set(EXAMPLE_COLUMNS[: EXAMPLE_COLUMNS.index("kv_fraction") + 1])
        missing = needed - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{table} lacks the columns {sorted(missing)}: is it a `mixkv eval` examples.csv?"
            )
        for row in reader:
            score = _float(row["score"])
            if not math.isfinite(score):
                raise ValueError(
                    f"{table}: {row['method']} at budget {row['budget'] or '-'} on {row['task']}, example "
                    f"{row['example']}, has no numeric score; a leaderboard needs per-example scores."
                )
            budget = int(row["budget"]) if row["budget"] else None
            cells = grid.setdefault((row["method"], budget), {})
            cells.setdefault((row["task"], row["context_length"]), []).append(
                ExampleRow(
                    example_sha1=row["example_sha1"],
                    score=score,
                    kv_fraction=_float(row["kv_fraction"]),
                    prefill_seconds=_float(row.get("prefill_seconds", "")),
                )
            )
    return grid


def _standing(method: str, budget: int | None, tasks: Mapping[TaskKey, list[ExampleRow]]) -> Standing:
    # (task, digest) order, so that the interval does not depend on the order of the csv rows.
    by_task = [sorted(tasks[task], key=lambda r: r.example_sha1) for task in sorted(tasks)]
    rows = [r for examples in by_task for r in examples]
    score, low, high = stratified_bootstrap_ci([[r.score for r in examples] for examples in by_task])
    prefill = [r.prefill_seconds for r in rows if math.isfinite(r.prefill_seconds)]
    return Standing(
        method=method,
        budget=budget,
        n=len(rows),
        score=score,
        low=low,
        high=high,
        kv_fraction=float(np.nanmean([r.kv_fraction for r in rows])),
        prefill_seconds=float(np.mean(prefill)) if prefill else math.nan,
    )


def _paired(
    leader: Mapping[TaskKey, list[ExampleRow]], other: Mapping[TaskKey, list[ExampleRow]]
) -> PairedComparison | None:
    """``other`` against ``leader`` on the examples both hold (matched by task and digest).

    Pairs in (task, digest) order, as in :func:`_standing`."""
    a: list[float] = []
    b: list[float] = []
    for task in sorted(leader):
        theirs = {r.example_sha1: r.score for r in other.get(task, [])}
        for r in sorted(leader[task], key=lambda r: r.example_sha1):
            if r.example_sha1 in theirs:
                a.append(r.score)
                b.append(theirs[r.example_sha1])
    return paired_comparison(a, b) if a else None


def _task_sizes(grid: GridExamples) -> dict[TaskKey, int]:
    """Per task, the most examples any cell of ``grid`` holds: what a finished cell holds."""
    sizes: dict[TaskKey, int] = {}
    for cells in grid.values():
        for task, examples in cells.items():
            sizes[task] = max(sizes.get(task, 0), len(examples))
    return sizes


def _finished(cells: Mapping[TaskKey, list[ExampleRow]], sizes: Mapping[TaskKey, int]) -> bool:
    return all(len(cells.get(task, [])) == size for task, size in sizes.items())


def standings(grid: GridExamples, budget: int) -> tuple[list[Standing], list[Standing]]:
    """The ranked methods of ``grid`` at ``budget`` (best first, each against the leader) and the
    reference lines (full cache, ``closed-book``), each only where it is finished: it holds every
    task's examples (see :func:`unfinished` for the others)."""
    sizes = _task_sizes(grid)
    ranked = [
        _standing(method, b, cells)
        for (method, b), cells in grid.items()
        if b == budget and method not in UNBUDGETED_METHODS and _finished(cells, sizes)
    ]
    ranked.sort(key=lambda s: (-s.score, s.method))
    if ranked:
        leader = grid[(ranked[0].method, budget)]
        ranked = [ranked[0]] + [
            Standing(**{**vars(s), "against_leader": _paired(leader, grid[(s.method, budget)])})
            for s in ranked[1:]
        ]
    references = [
        _standing(method, None, grid[(method, None)])
        for method in UNBUDGETED_METHODS
        if (method, None) in grid and _finished(grid[(method, None)], sizes)
    ]
    return ranked, references


@dataclass(frozen=True)
class Unfinished:
    """A method :func:`standings` leaves out at a budget because it lacks examples (a run still
    being computed).

    Attributes
    ----------
    method
        Its name.
    n, of
        Examples it holds, and examples a finished cell holds, over all tasks.
    leader
        The budget's leader (None where no method is ranked).
    against_leader
        It (B) against the leader (A) on the examples both hold: a paired comparison on part of
        the grid, not a rank; None without a leader or a common example.
    """

    method: str
    n: int
    of: int
    leader: str | None
    against_leader: PairedComparison | None


def unfinished(grid: GridExamples, budget: int, ranked: Sequence[Standing] | None = None) -> list[Unfinished]:
    """The methods at ``budget`` that :func:`standings` leaves out because they lack examples, by
    name, each against the leader on the examples it holds. ``ranked``: ``standings(grid,
    budget)[0]`` where the caller has it already (it is computed otherwise)."""
    sizes = _task_sizes(grid)
    if ranked is None:
        ranked, _ = standings(grid, budget)
    leader = ranked[0].method if ranked else None
    return [
        Unfinished(
            method=method,
            n=sum(len(examples) for examples in cells.values()),
            of=sum(sizes.values()),
            leader=leader,
            against_leader=None if leader is None else _paired(grid[(leader, budget)], cells),
        )
        for (method, b), cells in sorted(grid.items())
        if b == budget and method not in UNBUDGETED_METHODS and not _finished(cells, sizes)
    ]


def _percent(s: Standing) -> str:
    return f"{100 * s.score:.1f} [{100 * s.low:.1f}, {100 * s.high:.1f}]"


def _difference(c: PairedComparison) -> str:
    """B - A in points with its interval: bold where it excludes 0, else "(level)"."""
    diff = f"{100 * c.difference:+.1f} [{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}]"
    return f"**{diff}**" if c.significant else f"{diff} (level)"


def _seconds(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.2f}"


def _grid_lines(name: str, grid: GridExamples, plot: Path | None) -> list[str]:
    budgets = sorted({b for (_, b) in grid if b is not None})
    tasks = sorted({task for cells in grid.values() for task in cells})
    task_names = ", ".join(t if not length else f"{t} @ {length}" for t, length in tasks)
    lines = [f"## {name}", "", f"Tasks ({len(tasks)}, each counting once in the average): {task_names}.", ""]
    _, references = standings(grid, budgets[0]) if budgets else ([], [])
    for ref in references:
        label = "full cache" if ref.method == "full" else ref.method
        lines.append(f"* {label}: {_percent(ref)} (n = {ref.n})")
    if references:
        lines.append("")
    if plot is not None:
        lines += [f"![score against KV fraction, {name}]({plot.name})", ""]
    header = "| budget | rank | method | score % [95% CI] | n | KV kept | vs leader, points [95% CI] | W / T / L | prefill s |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    pending: list[tuple[int, Unfinished]] = []
    for budget in budgets:
        ranked, _ = standings(grid, budget)
        pending += [(budget, u) for u in unfinished(grid, budget, ranked)]
        for rank, s in enumerate(ranked, start=1):
            c = s.against_leader
            if c is None:
                versus, record = "leader", "-"
            else:
                versus = _difference(c)
                record = f"{c.wins} / {c.ties} / {c.losses}"
            lines.append(
                f"| {budget} | {rank} | {s.method} | {_percent(s)} | {s.n} | {100 * s.kv_fraction:.1f}% "
                f"| {versus} | {record} | {_seconds(s.prefill_seconds)} |"
            )
    if pending:
        lines += [
            "",
            "Not ranked yet (a run in progress), against the leader on the examples computed so far:",
            "",
        ]
        for budget, u in pending:
            c = u.against_leader
            versus = "-" if c is None else f"{_difference(c)}, n = {c.n}"
            lines.append(
                f"* {u.method} at {budget}: {u.n} of {u.of} examples; against {u.leader or '-'}: {versus}"
            )
    return [*lines, ""]


def _plot(name: str, grid: GridExamples, path: Path) -> Path | None:
    """Score against KV fraction, one line per method over its budgets, with 95% intervals."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    budgets = sorted({b for (_, b) in grid if b is not None})
    by_method: dict[str, list[Standing]] = {}
    references: list[Standing] = []
    for budget in budgets:
        ranked, references = standings(grid, budget)
        for s in ranked:
            by_method.setdefault(s.method, []).append(s)
    fig, ax = plt.subplots(figsize=(9.5, 5.0))
    # 20 colours and 7 markers: every (colour, marker) pair differs up to 140 methods.
    markers = "osD^vPX"
    for i, (method, points) in enumerate(sorted(by_method.items())):
        xs = [100 * s.kv_fraction for s in points]
        ys = [100 * s.score for s in points]
        errors = [[100 * (s.score - s.low) for s in points], [100 * (s.high - s.score) for s in points]]
        style = "-" if method.startswith("mixkv") else "--"
        ax.errorbar(
            xs,
            ys,
            yerr=errors,
            marker=markers[i % len(markers)],
            linestyle=style,
            capsize=2,
            label=method,
            color=plt.get_cmap("tab20")(i % 20),
        )
    for ref in references:
        ax.axhline(
            100 * ref.score,
            color="black",
            linestyle="--" if ref.method == "full" else ":",
            label="full cache" if ref.method == "full" else ref.method,
        )
    ax.set_xscale("log")
    # Ticks at the KV fractions the methods kept (the log axis' own labels read 6x10^0).
    ticks: list[float] = []
    for x in sorted(round(100 * s.kv_fraction, 1) for points in by_method.values() for s in points):
        if not ticks or x > 1.1 * ticks[-1]:  # one tick per budget, not one per method's rounding
            ticks.append(x)
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel("KV kept (% of the full cache, log scale)")
    ax.set_ylabel("score (%, task average)")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_leaderboard(
    grids: Mapping[str, Path | str], out: Path | str, *, plots: bool = True, exclude: Sequence[str] = ()
) -> Path:
    """Write ``out/leaderboard.md`` (one section per grid) and, with matplotlib, one plot per grid
    (``out/leaderboard-<i>.png``: score against KV fraction). ``grids`` maps a grid's title to its
    ``examples.csv`` (or the run directory). ``exclude`` names methods left out of every grid (e.g.
    those that pay a second forward, to rank the rest among themselves); each section says so.
    Returns the Markdown's path.

    Raises
    ------
    ValueError
        No grid, a grid :func:`read_grid` refuses, or an excluded method that no grid holds.
    """
    if not grids:
        raise ValueError("Give at least one grid: a title and the examples.csv of a `mixkv eval` run.")
    folder = Path(out)
    read = {name: read_grid(source) for name, source in grids.items()}
    held = {method for grid in read.values() for method, _ in grid}
    unknown = sorted(set(exclude) - held)
    if unknown:
        raise ValueError(f"No grid holds the method(s) {unknown} to exclude; the grids hold {sorted(held)}.")
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# Leaderboard", ""]
    for i, (name, source) in enumerate(grids.items(), start=1):
        grid = {key: cells for key, cells in read[name].items() if key[0] not in exclude}
        plot = _plot(name, grid, folder / f"leaderboard-{i}.png") if plots else None
        lines += _grid_lines(name, grid, plot)
        left_out = sorted({method for method, _ in read[name]} & set(exclude))
        if left_out:
            lines += [f"Left out: {', '.join(left_out)}.", ""]
        lines += [f"Source: `{source}`.", ""]
    path = folder / "leaderboard.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
