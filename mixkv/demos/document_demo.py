"""The document demo (``mixkv demo``): one long document with a hidden fact, answered from full and compressed caches.

Runs on SmolLM2-135M-Instruct by default (about 1-2 minutes on 2 CPU cores): a ~1.8k-token
document of repeated noise sentences hides one fact ("one of the special magic numbers for <key>
is: <7 digits>"); the model is asked for it with the full KV cache and with SnapKV, AdaKV and MixKV
(on SnapKV and on AdaKV) at budgets 64, 128, 256 and 512 tokens per KV head. ``--task
niah_single_2`` hides the fact in Python standard-library documentation instead (harder: at these
budgets the 135M model loses it with every press). Every row is a real
prefill + greedy decode; the table reports the answer, whether it is correct, the KV memory kept
after prefill and the prefill / decode times, and a PNG summarises memory and correctness.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mixkv.eval.tasks import make_examples
from mixkv.eval.text_example import encode_prompt
from mixkv.eval.text_example_run import run_example
from mixkv.presses.registry import build_press

__all__ = ["DEFAULT_METHODS", "method_runs", "plot_rows", "results_table", "run_demo"]

DEFAULT_METHODS = ("full", "snapkv", "adakv", "mixkv-snapkv", "mixkv-adakv")


def method_runs(methods: list[str], budgets: list[int]) -> list[tuple[str, int | None]]:
    """(method, budget) pairs in the methods' order: ``"full"`` once without a budget, every other
    method at every budget."""
    return [
        (m, None) if m == "full" else (m, b) for m in methods for b in ([None] if m == "full" else budgets)
    ]


def run_demo(
    model: Any,
    tokenizer: Any,
    *,
    methods: list[str],
    budgets: list[int],
    context_length: int = 1800,
    task: str = "niah_single_1",
    seed: int = 0,
    protocol: str = "query_aware",
    log: Any = print,
) -> tuple[Any, list[dict[str, Any]]]:
    """Run every (method, budget) on one generated example.

    Parameters
    ----------
    model, tokenizer
        A causal LM and its tokenizer.
    methods
        Method names (see ``mixkv presses``); ``"full"`` runs once.
    budgets
        Budgets in tokens per KV head.
    context_length
        Document length in tokens.
    task
        Task of :mod:`mixkv.eval.tasks` providing the document, question and answer.
    seed
        Example seed.
    protocol
        ``"query_aware"`` (question in the observation window) or ``"query_agnostic"``.
    log
        Where progress lines go.

    Returns
    -------
    tuple
        The example and one result row (a :func:`mixkv.eval.text_example_run.run_example` record plus
        ``method`` and ``budget``) per run.
    """
    example = make_examples(task, tokenizer, context_length, 1, seed)[0]
    context_ids, question_ids = encode_prompt(example, tokenizer)
    prefill_tokens = len(context_ids) + (len(question_ids) - 1 if protocol == "query_aware" else 0)
    for b in budgets:
        if b >= prefill_tokens:
            raise ValueError(
                f"budget {b} is not below the {prefill_tokens}-token prompt; nothing would be "
                "compressed. Use smaller budgets or a longer --context-length."
            )
    # Warm-up, so the first timed run does not pay one-off start-up costs.
    with torch.inference_mode():
        model(input_ids=torch.tensor([context_ids[:64]], device=model.device))
    rows: list[dict[str, Any]] = []
    runs = method_runs(methods, budgets)
    for method, budget in runs:
        press = build_press(method, budget, context_tokens=prefill_tokens)
        label = method if budget is None else f"{method} @ {budget}"
        log(f"  running {label} ...")
        record = run_example(model, tokenizer, example, press, protocol=protocol)
        record.update(method=method, budget=budget)
        rows.append(record)
    return example, rows


def results_table(rows: list[dict[str, Any]]) -> str:
    """One line per run: answer, correctness, KV kept, times (image tokens kept, for a VLM)."""
    images = all("image_tokens_total" in r for r in rows) and any(r["image_tokens_total"] for r in rows)
    head = ["method", "budget", "answer", "correct", "KV kept (MiB)", "% of full", "prefill s", "decode s"]
    if images:
        head.insert(6, "image tokens kept")
    lines = [head]
    for r in rows:
        answer = " ".join(r["output"].split())
        answer = answer if len(answer) <= 34 else answer[:31] + "..."
        lines.append(
            [
                r["method"],
                "-" if r["budget"] is None else str(r["budget"]),
                answer,
                "yes" if r["score"] >= 1.0 else ("partly" if r["score"] > 0 else "no"),
                f"{r['kv_bytes'] / 2**20:.2f}",
                f"{100 * r['kv_fraction']:.1f}%",
                f"{r['prefill_seconds']:.2f}",
                f"{r['decode_seconds']:.2f}",
            ]
        )
        if images:
            total = max(1, r["image_tokens_total"])
            lines[-1].insert(
                6, f"{r['image_tokens_kept']:.0f} of {total} ({100 * r['image_tokens_kept'] / total:.0f}%)"
            )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = []
    for k, row in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot_rows(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Write the memory and time PNG of the runs; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return False
    labels = [r["method"] if r["budget"] is None else f"{r['method']} @{r['budget']}" for r in rows]
    mem = [r["kv_bytes"] / 2**20 for r in rows]
    colors = ["tab:green" if r["score"] >= 1.0 else "tab:red" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    bars = ax1.bar(range(len(rows)), mem, color=colors)
    for bar, r in zip(bars, rows, strict=True):
        ax1.annotate(
            f"{100 * r['kv_fraction']:.1f}%",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax1.set_ylabel("KV cache after prefill (MiB)")
    ax1.set_xticks(range(len(rows)))
    ax1.set_xticklabels(labels, fontsize=8, rotation=35, ha="right")
    ax1.set_title("KV memory kept; green = correct answer, red = wrong")
    ax1.legend(handles=[Patch(color="tab:green", label="correct"), Patch(color="tab:red", label="wrong")])
    pre = [r["prefill_seconds"] for r in rows]
    dec = [r["decode_seconds"] for r in rows]
    ax2.bar(range(len(rows)), pre, label="prefill (+ compression)", color="tab:blue")
    ax2.bar(range(len(rows)), dec, bottom=pre, label="question + decode", color="tab:orange")
    ax2.set_xticks(range(len(rows)))
    ax2.set_xticklabels(labels, fontsize=8, rotation=35, ha="right")
    ax2.set_ylabel("seconds")
    ax2.set_title("time")
    ax2.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
