"""How evaluation results are reported: ``results.md`` (scores with confidence intervals, KV kept,
timings, paired comparisons), ``examples.csv`` (one row per cell and example: every statistic can
be recomputed from it) and score-vs-budget plots, from the cells' JSON content."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixkv.eval.cell_store import Cell, EvalResult
from mixkv.eval.stats_tables import (
    CORPUS_NOTE,
    UNBUDGETED_METHODS,
    cell_key,
    format_average,
    format_score,
    mixkv_base_pairs,
    paired_lines,
    sample_sizes,
)

__all__ = ["EXAMPLE_COLUMNS", "write_example_scores", "write_markdown_table", "write_summary"]

#: Columns of ``examples.csv``: the cell, the example's index and digest, then record fields.
EXAMPLE_COLUMNS = (
    "method",
    "budget",
    "task",
    "context_length",
    "example",
    "example_sha1",
    "score",
    "kv_fraction",
    "kept_tokens_mean",
    "new_tokens",
    "prefill_seconds",
    "decode_seconds",
    "image_tokens_total",
    "image_tokens_kept",
    "video_tokens_total",
    "video_tokens_kept",
    "context_sha1",
    "output",
)

logger = logging.getLogger("mixkv.eval")


def _cell_score(data: dict[str, Any]) -> float:
    return 100.0 * float(data["score"])


def _not_compressed(method: str, budget: int, length: int | None) -> bool:
    """Whether a compressed cell is skipped because its budget is not below the context length."""
    return method not in UNBUDGETED_METHODS and length is not None and budget >= length


def write_markdown_table(
    cells: Sequence[dict[str, Any]],
    path: Path,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    tasks: Sequence[str],
    context_lengths: Sequence[int | None],
    compare: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the score table (rows: method; columns: budget x task) per context length.

    Scores are mean example scores in percent with their 95% bootstrap interval over examples
    (:mod:`mixkv.eval.stats_tables`); the ``avg`` column averages the tasks, each counting once. The
    rows of the full cache and of ``closed-book`` (the question without its context) repeat their
    score under every budget. ``n/a`` marks a budget not below the context length, ``-`` a missing
    cell. With several tasks, a compact table repeats the ``avg``
    columns alone (method x budget). A further table per context length gives the mean
    fraction of KV bytes kept and the prefill / decode times, and, when the prompts hold images, a
    third the image tokens kept. A context length of None (multimodal grids) drops the per-length headings and the
    ``n/a`` rule. A last table compares, on the same examples, every MixKV method with its base
    (when both are in ``methods``) and every ``(A, B)`` pair of ``compare``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    index = {
        (c["cell"]["method"], c["cell"]["budget"], c["cell"]["task"], c["cell"]["context_length"]): c
        for c in cells
    }
    lines = ["# mixkv evaluation", ""]
    unfinished = [c for c in cells if c.get("complete") is False]
    if unfinished:
        lines += [
            f"**A run in progress** (`--report-only`): {len(unfinished)} of these {len(cells)} cells are "
            "unfinished and hold the examples their checkpoints had, cut per task to the examples all of "
            "them had (n below); a paired comparison with a finished cell uses those examples.",
            "",
        ]
    for length in context_lengths:
        where = "" if length is None else f"Context length {length} tokens: "
        shown = [c for c in cells if c["cell"]["context_length"] == length]
        lines += [f"## {where}score (%) [95% CI], {sample_sizes(shown, tasks)}", ""]
        header = ["method"] + [f"{b} {t}" for b in budgets for t in tasks]
        if len(tasks) > 1:
            header = ["method"] + [f"{b} {t}" for b in budgets for t in [*tasks, "avg"]]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        averages: list[list[str]] = []
        for method in methods:
            row, average_row = [method], [method]
            for b in budgets:
                found: list[dict[str, Any]] = []
                for t in tasks:
                    key = cell_key(method, b, t, length)
                    if _not_compressed(method, b, length):
                        row.append("n/a")
                    elif key in index:
                        found.append(index[key])
                        row.append(format_score(found[-1]))
                    else:
                        row.append("-")
                if len(tasks) > 1:
                    average_row.append(format_average(found) if len(found) == len(tasks) else "-")
                    row.append(average_row[-1])
            lines.append("| " + " | ".join(row) + " |")
            averages.append(average_row)
        if any("†" in text for text in lines[-len(methods) :]):
            lines += ["", CORPUS_NOTE]
        if len(tasks) > 1:
            # The wide table's avg columns alone: the summary a reader (or a README) quotes.
            lines += [
                "",
                f"## {where}average over the {len(tasks)} tasks (%) [95% CI], each task counting once",
                "",
            ]
            lines.append("| method | " + " | ".join(str(b) for b in budgets) + " |")
            lines.append("|" + "---|" * (len(budgets) + 1))
            lines += ["| " + " | ".join(row) + " |" for row in averages]
        lines += ["", f"## {where}KV kept (% of full), prefill s, decode s", ""]
        header = ["method"] + [f"budget {b}" for b in budgets]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for method in methods:
            row = [method]
            for b in budgets:
                ex = _examples_at(index, method, b, tasks, length)
                if not ex:
                    row.append("n/a" if _not_compressed(method, b, length) else "-")
                    continue
                frac = 100 * sum(e["kv_fraction"] for e in ex) / len(ex)
                pre = sum(e["prefill_seconds"] for e in ex) / len(ex)
                dec = sum(e["decode_seconds"] for e in ex) / len(ex)
                row.append(f"{frac:.1f}% / {pre:.2f} / {dec:.2f}")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines += _image_token_lines(index, methods, budgets, tasks, length)
    pairs = list(dict.fromkeys([*mixkv_base_pairs(methods), *compare]))
    lines += paired_lines(index, pairs, budgets, tasks, context_lengths)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _examples_at(
    index: dict[tuple[Any, ...], dict[str, Any]],
    method: str,
    budget: int,
    tasks: Sequence[str],
    length: int | None,
) -> list[dict[str, Any]]:
    """Every example record of ``method`` at ``budget`` (an unbudgeted method's at any) over ``tasks``."""
    keys = [cell_key(method, budget, t, length) for t in tasks]
    return [e for k in keys if k in index for e in index[k]["examples"]]


def _image_token_lines(
    index: dict[tuple[Any, ...], dict[str, Any]],
    methods: Sequence[str],
    budgets: Sequence[int],
    tasks: Sequence[str],
    length: int | None,
) -> list[str]:
    """Multimodal grids: mean image tokens kept per KV head, of the prompt's image tokens, and their
    share of all kept tokens (no lines when no cell has image tokens)."""
    rows = []
    for method in methods:
        row = [method]
        for b in budgets:
            ex = _examples_at(index, method, b, tasks, length)
            total = sum(e.get("image_tokens_total", 0) for e in ex)
            if not total:
                row.append("-")
                continue
            kept = sum(e["image_tokens_kept"] for e in ex)
            share = kept / sum(e["kept_tokens_mean"] for e in ex)
            row.append(f"{kept / len(ex):.0f} of {total / len(ex):.0f} ({100 * share:.0f}% of kept)")
        rows.append(row)
    if all(cell == "-" for row in rows for cell in row[1:]):
        return []
    header = ["method"] + [f"budget {b}" for b in budgets]
    lines = ["## image tokens kept per KV head (mean), and their share of all kept tokens", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _write_plots(
    cells: Sequence[dict[str, Any]],
    out_dir: Path,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    tasks: Sequence[str],
    context_lengths: Sequence[int | None],
) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots written (`pip install matplotlib`).")
        return []
    index = {
        (c["cell"]["method"], c["cell"]["budget"], c["cell"]["task"], c["cell"]["context_length"]): c
        for c in cells
    }
    panels = [*tasks, "average"] if len(tasks) > 1 else list(tasks)
    paths: list[Path] = []
    top = 105.0
    for c in cells:
        top = max(top, _cell_score(c) + 5)  # e.g. CIDEr-D x 100 can exceed 100
    for length in context_lengths:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, panel in zip(axes[0], panels, strict=True):
            panel_tasks = tasks if panel == "average" else [panel]
            for method in methods:
                if method in UNBUDGETED_METHODS:  # one score for every budget: a horizontal line
                    keys = [cell_key(method, None, t, length) for t in panel_tasks]
                    vals = [index[k] for k in keys if k in index]
                    if len(vals) == len(panel_tasks):
                        score = sum(_cell_score(v) for v in vals) / len(vals)
                        style = "--" if method == "full" else ":"
                        label = "full cache" if method == "full" else method
                        ax.axhline(score, color="black", linestyle=style, label=label)
                    continue
                xs, ys = [], []
                for b in budgets:
                    vals = [
                        index[(method, b, t, length)] for t in panel_tasks if (method, b, t, length) in index
                    ]
                    if len(vals) == len(panel_tasks):
                        xs.append(b)
                        ys.append(sum(_cell_score(v) for v in vals) / len(vals))
                if xs:  # 20 colours: more than 10 methods stay distinguishable
                    ax.plot(
                        xs,
                        ys,
                        marker="o",
                        label=method,
                        color=plt.get_cmap("tab20")(methods.index(method) % 20),
                    )
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(budgets))
            ax.set_xticklabels([str(b) for b in budgets])
            ax.set_ylim(-5, top)
            ax.set_xlabel("budget (tokens per KV head)")
            ax.set_ylabel("score (%)")
            ax.set_title(panel if length is None else f"{panel} @ {length} tokens")
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path = out_dir / ("score_vs_budget.png" if length is None else f"score_vs_budget_L{length}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_example_scores(cells: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write ``path`` as CSV with one row per (cell, example) of the finished ``cells``, in the
    order given, columns :data:`EXAMPLE_COLUMNS` (empty where a record lacks a field; an empty
    budget is the full cache, an empty context length a multimodal task). Small enough to keep
    with published figures, where the cells' JSON files (outputs, reports) are not.
    """
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(EXAMPLE_COLUMNS)
        for data in cells:
            cell = data["cell"]
            for index, record in enumerate(data["examples"]):
                fields = {**cell, "example": index, **record}
                writer.writerow(["" if fields.get(c) is None else fields[c] for c in EXAMPLE_COLUMNS])
    return path


def write_summary(
    result: EvalResult,
    cells: Sequence[Cell],
    finished: dict[Cell, dict[str, Any]],
    out: Path,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    tasks: Sequence[str],
    context_lengths: Sequence[int | None],
    compare: Sequence[tuple[str, str]] = (),
) -> None:
    """Fill ``result.cells`` and write ``results.md``, ``examples.csv`` and the plots."""
    result.cells = [finished[c] for c in cells if c in finished]
    result.table_path = write_markdown_table(
        result.cells,
        out / "results.md",
        methods=methods,
        budgets=budgets,
        tasks=tasks,
        context_lengths=context_lengths,
        compare=compare,
    )
    write_example_scores(result.cells, out / "examples.csv")
    result.plot_paths = _write_plots(
        result.cells, out, methods=methods, budgets=budgets, tasks=tasks, context_lengths=context_lengths
    )
