"""``mixkv demo``: a question about a long document (or, with ``--model tiny-vlm``, a picture),
answered from the full cache and from every press x budget (:mod:`mixkv.demos`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mixkv.commands.parsing import int_list, split_list
from mixkv.demos.document_demo import DEFAULT_METHODS, plot_rows, results_table, run_demo
from mixkv.demos.image_demo import plot_keep_maps, run_image_demo
from mixkv.eval.tiny_vlm_tasks import TASK_FAMILIES, make_tiny_vlm_suite
from mixkv.model_loading import load_model
from mixkv.presses.registry import NAMES, is_method_name


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
        methods = split_list(args.methods)
        bad = [m for m in methods if not is_method_name(m)]
        if bad:
            raise ValueError(
                f"unknown method(s) {bad}; choose from: {', '.join(NAMES)}, or <method>@kvpress-<scorer> "
                "(`mixkv presses`)"
            )
        budgets = int_list(args.budgets, "--budgets")
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
    print(results_table(rows))
    title = (
        f"{args.model or 'SmolLM2-135M-Instruct'}: {example.context_tokens}-token document with one "
        f"hidden fact ({args.task}, {args.protocol})"
    )
    out = Path(args.out)
    if plot_rows(rows, out, title):
        print(f"\nPlot written to {out}")
    else:
        print("\nmatplotlib is not installed: no plot written (`pip install matplotlib`).")
    print(f"Total wall time {time.perf_counter() - start:.1f} s on {torch.get_num_threads()} threads.")
    return 0


def _image_demo(
    model: Any, processor: Any, args: argparse.Namespace, methods: list[str], budgets: list[int], start: float
) -> int:
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
    print(results_table(rows))
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
