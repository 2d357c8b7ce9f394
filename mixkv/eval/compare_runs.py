"""Two runs of ``mixkv eval`` compared on the same examples: ``mixkv compare RUN_A RUN_B``.

What differs between the runs is the user's choice: the parameter dtype (float32 against
bfloat16), the protocol (query-aware against query-agnostic), the transformers version, a change
to the code. Cells are matched by (method, budget, task, context length); within a cell the
examples are paired by position and must be the same examples (their recorded ``example_sha1``,
``context_sha1`` or ``id`` agree), which holds for two runs of the same model, tasks and seed
whatever their ``--n`` (examples depend on their index and the seed, not on ``n``). Each pair of
cells is cut to the examples both runs have, finished or checkpointed, so a run in progress can be
compared. Statistics as in ``results.md`` (:func:`mixkv.eval.stats.paired_comparison`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixkv.eval.stats import paired_comparison
from mixkv.eval.stats_tables import COMPARISON_HEADER, comparison_columns, example_scores, format_budget

__all__ = ["compare_runs", "read_run"]

CellKey = tuple[str, int | None, str, int | None]

#: Metrics whose cell score is computed over the whole corpus, not as the mean of example scores.
_CORPUS_METRICS = frozenset({"cider_d"})

#: Record fields that identify an example; paired records must agree on every one both carry.
_EXAMPLE_KEYS = ("example_sha1", "context_sha1", "id")


def read_run(out_dir: Path | str) -> dict[CellKey, dict[str, Any]]:
    """Every cell of a ``mixkv eval`` output directory: finished cells (``cells/*.json``) and, for
    cells not finished, their checkpoints (``cells/.*.partial``), keyed by
    ``(method, budget, task, context_length)``.

    Raises
    ------
    ValueError
        ``out_dir`` holds no cell (not an output directory of ``mixkv eval``, or nothing done yet).
    """
    cell_dir = Path(out_dir) / "cells"
    found: dict[CellKey, dict[str, Any]] = {}
    files = sorted(cell_dir.glob("*.json")) + sorted(cell_dir.glob(".*.partial"))
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            meta = data["cell"]
            key = (meta["method"], meta["budget"], meta["task"], meta["context_length"])
            examples = [e for e in data["examples"] if isinstance(e, dict)]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a file that is not a cell (or is being written) is no evidence
        if key in found:  # a finished cell comes first and wins over its checkpoint
            continue
        if "score" not in data:  # a checkpoint: its score is its examples' mean, unless corpus-level
            per_example = examples and not any(e.get("metric") in _CORPUS_METRICS for e in examples)
            data["score"] = float(np.mean([e["score"] for e in examples])) if per_example else float("nan")
        found[key] = {**data, "examples": examples}
    if not found:
        raise ValueError(
            f"{out_dir} holds no cells (expected {cell_dir}/*.json from `mixkv eval --out {out_dir}`)."
        )
    return found


def _same_example(x: Mapping[str, Any], y: Mapping[str, Any]) -> bool | None:
    """Whether two records are of the same example; None when they share no identifying field."""
    shared = [key for key in _EXAMPLE_KEYS if key in x and key in y]
    return None if not shared else all(x[key] == y[key] for key in shared)


def _paired_scores(key: CellKey, a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The two cells' scores on the examples both have, in order.

    Raises ValueError when an example both have is not the same example in both runs.
    """
    n = min(len(a["examples"]), len(b["examples"]))
    for i in range(n):
        same = _same_example(a["examples"][i], b["examples"][i])
        if not same:
            why = "differs" if same is False else "carries no example_sha1, context_sha1 or id to check"
            raise ValueError(
                f"Cannot pair cell {key}: its example {i} {why} between the runs; compare runs of the same "
                "model, tasks and seed."
            )
    scores = [np.array([float(e["score"]) for e in cell["examples"][:n]]) for cell in (a, b)]
    return scores[0], scores[1]


def _per_example_mean(cell: Mapping[str, Any]) -> bool:
    return bool(cell["examples"]) and example_scores(cell) is not None


def _describe(cells: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """What a run was: its identity (model, dtype, protocol, ...) and, from finished cells,
    the software versions; a field that varies between its cells is shown as ``mixed``."""
    fields: dict[str, set[str]] = {}
    for cell in cells:
        for name, value in {**cell.get("identity", {}), **cell.get("versions", {})}.items():
            fields.setdefault(name, set()).add(str(value))
    return {name: values.pop() if len(values) == 1 else "mixed" for name, values in fields.items()}


def compare_runs(
    run_a: Path | str,
    run_b: Path | str,
    *,
    methods: Sequence[str] | None = None,
    labels: tuple[str, str] | None = None,
) -> list[str]:
    """Markdown lines comparing run B with run A on the same examples.

    A header says what differs between the runs (identity fields and software versions); a table
    gives, per method and budget, B - A pooled over the (task, context length) cells both runs
    have, with its 95% paired-bootstrap interval (bold only when it excludes 0), wins / ties /
    losses of B and the exact sign-test p-value; a second table gives each cell when a row pools
    several. Cells with a corpus-level score are left out (said in a note).

    Parameters
    ----------
    run_a, run_b
        Output directories of ``mixkv eval`` (``--out``).
    methods
        Only these methods (default: every method both runs have).
    labels
        How the header names runs A and B (default: their directories as given), e.g. paths
        relative to where the table is written, so that it reads the same on any machine.

    Raises
    ------
    ValueError
        No cell in either directory, no cell in common, or a common example that is not the same
        example in both runs.
    """
    a_cells, b_cells = read_run(run_a), read_run(run_b)
    common = [k for k in a_cells if k in b_cells and (methods is None or k[0] in methods)]
    if not common:
        wanted = "" if methods is None else f" for methods {list(methods)}"
        raise ValueError(
            f"{run_a} and {run_b} have no (method, budget, task, context length) cell in common{wanted}."
        )
    # Methods in the order run A was asked for them, then any others alphabetically.
    asked: list[str] = next((c["config"]["methods"] for c in a_cells.values() if "config" in c), [])
    order = {m: i for i, m in enumerate(dict.fromkeys([*asked, *sorted(k[0] for k in a_cells)]))}
    common.sort(key=lambda k: (order[k[0]], k[1] or 0, k[3] or 0, k[2]))
    per_cell: list[list[str]] = []
    pooled: dict[tuple[str, int | None], list[tuple[np.ndarray, np.ndarray]]] = {}
    left_out = 0
    for key in common:
        a, b = a_cells[key], b_cells[key]
        if not (_per_example_mean(a) and _per_example_mean(b)):
            left_out += 1
            continue
        x, y = _paired_scores(key, a, b)
        if x.size == 0:
            continue
        method, budget, task, length = key
        where = [task, "-" if length is None else str(length)]
        per_cell.append(
            [
                method,
                format_budget(budget),
                *where,
                *comparison_columns(paired_comparison(x, y)),
            ]
        )
        pooled.setdefault((method, budget), []).append((x, y))
    lines = ["# Run B against run A on the same examples", ""]
    described = [_describe([a_cells[k] for k in common]), _describe([b_cells[k] for k in common])]
    # Only what both runs recorded (a run in progress has no software versions yet).
    names = sorted(set(described[0]) & set(described[1]))
    differing = [n for n in names if described[0][n] != described[1][n]]
    label_a, label_b = labels or (str(run_a), str(run_b))
    lines += [f"- A: `{label_a}`", f"- B: `{label_b}`"]
    if differing:
        lines.append(
            "- What differs: "
            + "; ".join(f"{n} {described[0][n]} (A) vs {described[1][n]} (B)" for n in differing)
        )
    same = [f"{n} {described[0][n]}" for n in names if n not in differing]
    if same:
        lines.append("- Same in both: " + ", ".join(same))
    lines += [
        "",
        "Scores in %, differences in points. Each cell's examples are those both runs have (paired by "
        "example); 95% paired-bootstrap CI of the difference (10,000 resamples of examples, seed 0), "
        "**bold** only when it excludes 0; p: exact two-sided sign test on the examples where A and B differ.",
        "",
        f"| method | budget | cells | {COMPARISON_HEADER} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, budget), pairs in pooled.items():
        x = np.concatenate([p[0] for p in pairs])
        y = np.concatenate([p[1] for p in pairs])
        row = [
            method,
            format_budget(budget),
            str(len(pairs)),
            *comparison_columns(paired_comparison(x, y)),
        ]
        lines.append("| " + " | ".join(row) + " |")
    if left_out:
        lines += [
            "",
            f"{left_out} cell(s) with a corpus-level score (no per-example scores to pair) left out.",
        ]
    if len(per_cell) > len(pooled):
        lines += [
            "",
            "## Per (task, context length)",
            "",
            f"| method | budget | task | context | {COMPARISON_HEADER} |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *("| " + " | ".join(row) + " |" for row in per_cell),
        ]
    return [*lines, ""]
