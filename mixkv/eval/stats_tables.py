"""Markdown pieces of ``results.md`` that carry uncertainty: scores with confidence intervals and
paired comparisons of two methods on the same examples (maths in :mod:`mixkv.eval.stats`).

Inputs are the cell dicts written by :mod:`mixkv.eval.runner` (``cell``: method, budget, task,
context length; ``score``: the cell's score in [0, 1]; ``examples``: records with a per-example
``score``), indexed by :func:`cell_key`: ``(method, budget, task, context_length)`` with budget None
for the methods that have none (:data:`UNBUDGETED_METHODS`).
Scores are shown in percent, differences in percentage points. A cell whose ``score`` is not the
mean of its examples' scores (a corpus-level metric such as CIDEr-D, or a task mixing metrics) has
no per-example interval: it is shown with a ``†`` and left out of paired comparisons.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mixkv.eval.stats import PairedComparison, bootstrap_ci, paired_comparison, stratified_bootstrap_ci

__all__ = [
    "COMPARISON_HEADER",
    "CORPUS_NOTE",
    "UNBUDGETED_METHODS",
    "cell_key",
    "comparison_columns",
    "example_scores",
    "format_average",
    "format_budget",
    "format_p",
    "format_score",
    "mixkv_base_pairs",
    "paired_lines",
    "sample_sizes",
]

CellKey = tuple[str, int | None, str, int | None]

#: Methods run once per (task, context length), not per budget: the full cache, and the question
#: without its context (``closed-book``, what the model answers from memory or guesses).
UNBUDGETED_METHODS: tuple[str, ...] = ("full", "closed-book")


def cell_key(method: str, budget: int | None, task: str, length: int | None) -> CellKey:
    """The index key of ``method``'s cell at ``budget``: budget None for an unbudgeted method, whose
    one cell stands for every budget."""
    return (method, None if method in UNBUDGETED_METHODS else budget, task, length)


#: Legend of the ``†`` mark.
CORPUS_NOTE = "† corpus-level score (CIDEr-D or a mix of metrics): no per-example interval."

#: Headers of :func:`comparison_columns`, joined for a Markdown table row.
COMPARISON_HEADER = "n | A mean | B mean | B - A [95% CI] | B wins / ties / losses | sign-test p"

#: Keys that identify an example in a record; paired records must agree on those both carry.
_EXAMPLE_KEYS = ("context_sha1", "id")


def example_scores(cell: Mapping[str, Any]) -> np.ndarray | None:
    """Per-example scores of a cell, or None when the cell's score is not their mean."""
    scores = np.array([float(e["score"]) for e in cell["examples"]], dtype=np.float64)
    if scores.size == 0 or not np.isclose(scores.mean(), float(cell["score"]), rtol=1e-9, atol=1e-12):
        return None
    return scores


def _interval_text(mean: float, low: float, high: float) -> str:
    return f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def format_score(cell: Mapping[str, Any]) -> str:
    """A cell's score in percent with its 95% bootstrap interval: ``"72.0 [58.0, 84.0]"``
    (``"41.3†"`` for a corpus-level score)."""
    scores = example_scores(cell)
    if scores is None:
        return f"{100 * float(cell['score']):.1f}†"
    return _interval_text(*bootstrap_ci(scores))


def format_average(cells: Sequence[Mapping[str, Any]]) -> str:
    """Average score of several cells (each cell counting once, e.g. one per task) in percent,
    with its 95% stratified-bootstrap interval (examples resampled within each cell)."""
    groups = [example_scores(c) for c in cells]
    if any(g is None for g in groups):
        return f"{100 * sum(float(c['score']) for c in cells) / len(cells):.1f}†"
    return _interval_text(*stratified_bootstrap_ci([g for g in groups if g is not None]))


def sample_sizes(cells: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """The number of examples per cell, for a table heading: ``"n = 50 per cell"``, or per task
    (``"n per cell: docvqa 100, textvqa 40"``, a range where a task's cells differ)."""
    per_task: dict[str, set[int]] = {t: set() for t in tasks}
    for c in cells:
        per_task.setdefault(c["cell"]["task"], set()).add(len(c["examples"]))
    every = set().union(*per_task.values())
    if not every:
        return "n = 0"
    if len(every) == 1:
        return f"n = {every.pop()} per cell"
    parts = [
        f"{t} {min(ns)}" if len(ns) == 1 else f"{t} {min(ns)}-{max(ns)}" for t, ns in per_task.items() if ns
    ]
    return "n per cell: " + ", ".join(parts)


def mixkv_base_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """``(base, "mixkv-<base>")`` for every MixKV method whose base is also in ``methods``."""
    return [
        (m.removeprefix("mixkv-"), m)
        for m in methods
        if m.startswith("mixkv-") and m.removeprefix("mixkv-") in methods
    ]


def _paired_scores(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """Example scores of two cells of the same examples, or None if either is corpus-level.

    A cell of a run in progress (``"complete": False``) holds the first examples of its task, so it
    pairs with another cell on the examples both have; two finished cells must hold as many.

    Raises ValueError when the cells do not hold the same examples in the same order.
    """
    names = f"{a['cell']} and {b['cell']}"
    counts = len(a["examples"]), len(b["examples"])
    in_progress = a.get("complete") is False or b.get("complete") is False
    if counts[0] != counts[1] and not in_progress:
        raise ValueError(
            f"Cannot pair {names}: {counts[0]} and {counts[1]} examples; paired cells "
            "must come from the same run (same n and seed)."
        )
    n = min(counts)
    for i, (x, y) in enumerate(zip(a["examples"][:n], b["examples"][:n], strict=True)):
        for key in _EXAMPLE_KEYS:
            if key in x and key in y and x[key] != y[key]:
                raise ValueError(
                    f"Cannot pair {names}: example {i} differs ({key} {x[key]!r} vs {y[key]!r}); paired "
                    "cells must hold the same examples (same seed, tasks and model)."
                )
    sa, sb = example_scores(a), example_scores(b)
    return None if sa is None or sb is None else (sa[:n], sb[:n])


def format_budget(budget: int | None) -> str:
    """A budget as the tables print it: ``-`` for an unbudgeted method's cell (budget None)."""
    return "-" if budget is None else str(budget)


def format_p(p_value: float) -> str:
    """A p-value as the tables print it: three decimals, ``<0.001`` below that."""
    return "<0.001" if p_value < 0.001 else f"{p_value:.3f}"


def comparison_columns(c: PairedComparison) -> list[str]:
    """The Markdown columns of a paired comparison, in the order of :data:`COMPARISON_HEADER`:
    n, both means (%), B - A with its interval (points; bold when it excludes 0),
    wins / ties / losses, sign-test p."""
    diff = f"{100 * c.difference:+.1f} [{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}]"
    p = format_p(c.p_value)
    return [
        str(c.n),
        f"{100 * c.mean_a:.1f}",
        f"{100 * c.mean_b:.1f}",
        f"**{diff}**" if c.significant else diff,
        f"{c.wins} / {c.ties} / {c.losses}",
        p,
    ]


def paired_lines(
    index: Mapping[CellKey, Mapping[str, Any]],
    pairs: Sequence[tuple[str, str]],
    budgets: Sequence[int],
    tasks: Sequence[str],
    context_lengths: Sequence[int | None],
) -> list[str]:
    """Markdown lines comparing each method pair ``(A, B)`` per budget on the same examples.

    For each pair and budget, the examples of every (task, context length) where both A and B
    have a cell are pooled (paired by position within each cell) and compared with
    :func:`~mixkv.eval.stats.paired_comparison`: n, both means, B - A with its 95%
    paired-bootstrap interval (bold only when the interval excludes 0), wins / ties / losses of B,
    and the exact sign-test p-value. A second table gives the same per (task, context length)
    when some row pools more than one cell. An unbudgeted method (budget None in ``index``) pairs
    with every budget; two unbudgeted methods (``closed-book`` against ``full``) give one row,
    budget ``-``.

    Returns
    -------
    list of str
        The lines (empty when no pair has a common cell).

    Raises
    ------
    ValueError
        Two cells to pair do not hold the same examples (count, ``context_sha1`` or ``id``).
    """
    pooled: list[list[str]] = []
    per_cell: list[list[str]] = []
    left_out = False
    for a, b in pairs:
        unbudgeted = a in UNBUDGETED_METHODS and b in UNBUDGETED_METHODS
        pair_budgets: Sequence[int | None] = [None] if unbudgeted else budgets
        for budget in pair_budgets:
            xs: list[np.ndarray] = []
            ys: list[np.ndarray] = []
            rows: list[list[str]] = []
            for length in context_lengths:
                for task in tasks:
                    ka, kb = cell_key(a, budget, task, length), cell_key(b, budget, task, length)
                    if ka not in index or kb not in index:
                        continue
                    scores = _paired_scores(index[ka], index[kb])
                    if scores is None:
                        left_out = True
                        continue
                    xs.append(scores[0])
                    ys.append(scores[1])
                    where = [task] if length is None else [task, str(length)]
                    rows.append(
                        [a, b, format_budget(budget), *where, *comparison_columns(paired_comparison(*scores))]
                    )
            if not xs:
                continue
            comparison = paired_comparison(np.concatenate(xs), np.concatenate(ys))
            pooled.append([a, b, format_budget(budget), str(len(xs)), *comparison_columns(comparison)])
            per_cell += rows
    if not pooled:
        return []
    columns = COMPARISON_HEADER + " |"
    context = [] if all(length is None for length in context_lengths) else ["context"]
    cells = "(task, context length) cells" if context else "tasks"
    lines = [
        "## Paired comparisons (B against A on the same examples)",
        "",
        f"Scores in %, differences in points. Pooled over the {cells} both methods have; 95% "
        "paired-bootstrap CI of the difference (10,000 resamples of examples, seed 0), **bold** only "
        "when it excludes 0; p: exact two-sided sign test on the examples where A and B differ.",
        "",
        f"| A | B | budget | cells | {columns}",
        "|---|---|---|---|---|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in pooled),
        "",
    ]
    if left_out:
        lines[-1:-1] = ["", "Cells with a corpus-level score (†) are left out."]
    if len(per_cell) > len(pooled):
        header = ["A", "B", "budget", "task", *context]
        lines += [
            "### Per (task, context length)" if context else "### Per task",
            "",
            f"| {' | '.join(header)} | {columns}",
            "|" + "---|" * (len(header) + 6),
            *("| " + " | ".join(row) + " |" for row in per_cell),
            "",
        ]
    return lines
