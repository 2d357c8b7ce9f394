"""The mixkv demo: one long document with a hidden fact, answered from full and compressed caches.

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

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "method_runs", "run_demo"]

DEFAULT_METHODS = ("full", "snapkv", "adakv", "mixkv-snapkv", "mixkv-adakv")


def method_runs(methods: list[str], budgets: list[int]) -> list[tuple[str, int | None]]:
    """(method, budget) pairs in the methods' order: ``"full"`` once without a budget, every other
    method at every budget."""
    return [
        (m, None) if m == "full" else (m, b) for m in methods for b in ([None] if m == "full" else budgets)
    ]


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


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
        The example and one result row (a :func:`mixkv.eval.example.run_example` record plus
        ``method`` and ``budget``) per run.
    """
    from mixkv.eval.example import run_example
    from mixkv.eval.tasks import encode_prompt, make_examples
    from mixkv.presses.registry import build_press

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


def _table(rows: list[dict[str, Any]]) -> str:
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


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
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


def main(argv: list[str] | None = None) -> int:
    """Run the demo from the command line.

    Parameters
    ----------
    argv
        Arguments (without the program name); default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success, 2 on invalid input or a missing model (the message says what to do).
    """
    p = argparse.ArgumentParser(
        prog="mixkv demo",
        description="Ask a question about a long document with full and compressed KV caches.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="smollm2 (default), gemma3-270m, qwen2.5-coder-0.5b, a model directory, or tiny-vlm: the "
        "image demo (a question about a picture, with a heat map of the image tokens each press kept)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma separated method names (default: " + ",".join(DEFAULT_METHODS) + ")",
    )
    p.add_argument(
        "--budgets",
        default=None,
        help="comma separated budgets in tokens per KV head (default 64,128,256,512; 32,64,128 for tiny-vlm)",
    )
    p.add_argument(
        "--family", choices=["board", "chart", "gui"], default="board", help="tiny-vlm: the image family"
    )
    p.add_argument("--index", type=int, default=0, help="tiny-vlm: which held-out test image of the family")
    p.add_argument("--context-length", type=int, default=1800, help="document length in tokens")
    p.add_argument(
        "--task",
        default="niah_single_1",
        help="task providing the document (default niah_single_1: a number hidden in repeated noise sentences)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--protocol",
        choices=["query_aware", "query_agnostic"],
        default="query_aware",
        help="query_aware: question in the prompt being compressed (default); query_agnostic: "
        "compress the document before the question is asked",
    )
    p.add_argument("--out", default="mixkv_demo.png", help="PNG to write (default ./mixkv_demo.png)")
    args = p.parse_args(argv)
    image_demo = (args.model or "").strip().lower() == "tiny-vlm"
    if args.budgets is None:
        args.budgets = "32,64,128" if image_demo else "64,128,256,512"
    if args.methods is None:
        args.methods = ",".join(DEFAULT_METHODS)
    start = time.perf_counter()
    try:
        from mixkv.models import load_model
        from mixkv.presses.registry import NAMES

        methods = _split(args.methods)
        bad = [m for m in methods if m not in NAMES]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from: {', '.join(NAMES)}")
        try:
            budgets = [int(b) for b in _split(args.budgets)]
        except ValueError as exc:
            raise ValueError(f"--budgets takes integers such as 64,128, got {args.budgets!r}") from exc
        if not budgets or any(b < 1 for b in budgets):
            raise ValueError(f"--budgets needs positive integers, got {args.budgets!r}")
        print(f"Loading {args.model or 'SmolLM2-135M-Instruct'} ...")
        model, tokenizer = load_model(args.model)
        if image_demo:
            return _image_demo(model, tokenizer, args, methods, budgets, start)
        example, rows = run_demo(
            model,
            tokenizer,
            methods=methods,
            budgets=budgets,
            context_length=args.context_length,
            task=args.task,
            seed=args.seed,
            protocol=args.protocol,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"mixkv demo: error: {exc}", file=sys.stderr)
        return 2
    needles = example.metadata.get("needles") or [example.metadata.get("document", "")]
    print()
    print(f"Document: {example.context_tokens} tokens ({args.task}, seed {args.seed}, {args.protocol}).")
    print(f"Hidden fact: {needles[0]}")
    print(f"Question: {example.question}")
    print(f"Expected: {', '.join(example.answers)}")
    print()
    print(_table(rows))
    title = (
        f"{args.model or 'SmolLM2-135M-Instruct'}: {example.context_tokens}-token document with one "
        f"hidden fact ({args.task}, {args.protocol})"
    )
    out = Path(args.out)
    if _plot(rows, out, title):
        print(f"\nPlot written to {out}")
    else:
        print("\nmatplotlib is not installed: no plot written (`pip install matplotlib`).")
    print(f"Total wall time {time.perf_counter() - start:.1f} s on {torch.get_num_threads()} threads.")
    return 0


def _image_demo(
    model: Any, processor: Any, args: argparse.Namespace, methods: list[str], budgets: list[int], start: float
) -> int:
    from mixkv.tiny_vlm.demo import plot_keep_maps, run_image_demo
    from mixkv.tiny_vlm.tasks import TASK_FAMILIES, make_tiny_vlm_suite

    task = next(name for name, family in TASK_FAMILIES.items() if family == args.family)
    out = Path(args.out)
    example = make_tiny_vlm_suite(task, args.index + 1, args.seed, out.parent / "mixkv_demo_images")[
        args.index
    ]
    rows = run_image_demo(model, processor, example, methods=methods, budgets=budgets)
    print()
    print(
        f"Image: {example.image_path} ({rows[0]['image_tokens']} image tokens, {rows[0]['prompt_tokens']}-token prompt)"
    )
    print(f"Question: {example.question}")
    print(f"The answer starts with: {example.answer_prefix!r}; expected: {example.answers[0]}")
    print()
    print(_table(rows))
    title = (
        f"tiny-vlm (trained here on synthetic images; frozen Qwen2.5-Coder-0.5B): image tokens kept "
        f"per press and budget ({task} #{args.index}, seed {args.seed})"
    )
    if plot_keep_maps(example, rows, out, title):
        print(f"\nHeat map written to {out}")
    else:
        print("\nmatplotlib is not installed: no heat map written (`pip install matplotlib`).")
    print(f"Total wall time {time.perf_counter() - start:.1f} s on {torch.get_num_threads()} threads.")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
