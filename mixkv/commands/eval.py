"""Command line for the evaluation grid (``mixkv eval ...``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from mixkv.commands.parsing import checked_device, int_list, method_pairs, split_list

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``mixkv eval``."""
    from mixkv.eval.methods import METHODS
    from mixkv.eval.mm_tasks import MM_TASKS
    from mixkv.eval.suites import SUITES
    from mixkv.eval.tasks import TASKS

    p = argparse.ArgumentParser(
        prog="mixkv eval",
        description=(
            "Run a resumable grid of KV-cache compression methods x budgets x long-context tasks "
            "x context lengths, or (with a local vision-language model) methods x budgets x "
            "multimodal tasks; writes one JSON per finished cell, results.md and PNG plots."
        ),
    )
    p.add_argument(
        "--model",
        default=None,
        help="smollm2 (default), gemma3-270m, qwen2.5-coder-0.5b, a model directory or .gguf; multimodal tasks need a "
        "vision-language model directory",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["full,snapkv,adakv,mixkv-snapkv,mixkv-adakv"],
        help=f"comma or space separated; from: {', '.join(METHODS)} (`mixkv presses` describes them). Text "
        "tasks: closed-book asks the question without its context (the floor a press must beat), and a mixkv "
        "press may end in +chunkN (prefill in chunks of N tokens, compressing as it goes) "
        "and/or +decodeN (re-compress to the budget every N tokens after the prompt), e.g. mixkv-snapkv+chunk512",
    )
    p.add_argument("--budgets", nargs="+", default=["64,128"], help="tokens per KV head, e.g. 64,128,256")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["niah_single_1,niah_single_2"],
        help=f"text tasks from: {', '.join(TASKS)}; or multimodal tasks from: {', '.join(MM_TASKS)} "
        "(text and multimodal tasks cannot be mixed in one run)",
    )
    p.add_argument("--context-lengths", nargs="+", default=["1024"], help="context tokens, e.g. 1024,2048")
    p.add_argument(
        "--data",
        nargs="+",
        default=[],
        help="annotation file of a multimodal benchmark: FILE when one benchmark task is run, else "
        "TASK=FILE per task (e.g. docvqa=val_v1.0.json)",
    )
    p.add_argument(
        "--images",
        nargs="+",
        default=[],
        help="image folder of a multimodal benchmark: DIR or TASK=DIR (optional for docvqa: its root; for "
        "videomme the frames folder holding <videoID>/ of each video)",
    )
    p.add_argument(
        "--coordinate-scale",
        choices=["pixel", "normalized_1", "normalized_1000"],
        default="pixel",
        help="coordinates the model answers in, for screenspot / synthetic_gui_grounding",
    )
    p.add_argument(
        "-n",
        "--n",
        type=int,
        default=5,
        help="examples per cell (default 5; multimodal: first n / n generated); under torchrun write -n, "
        "since torchrun takes --n for its own --nnodes",
    )
    p.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default=None,
        help="run a fixed, seeded suite instead of the grid flags (quick: the regression guard, a few "
        "minutes on 2 cores) and compare it with its recorded reference; only --out applies",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        default="float32",
        help="text tasks: parameter dtype, float32 (default) or bfloat16 (about 2.3x faster on CPUs with "
        "AVX512-BF16); recorded in every cell",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model runs: cpu (default), cuda, cuda:1...; recorded in run.json's configuration",
    )
    p.add_argument("--out", default="mixkv_results", help="output directory (default ./mixkv_results)")
    p.add_argument(
        "--protocol",
        nargs="+",
        default=["query_agnostic"],
        help="query_agnostic (default: the question comes after compression) and/or query_aware (the question "
        "is in the compressed prompt). Both: one shared prefill per example serves both; each protocol's "
        "files go to OUT/<protocol>/ and protocols.md compares them. Text tasks only; multimodal prompts are "
        "always compressed whole (query_aware)",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="A:B",
        help="method pairs to compare on the same examples in results.md (B - A with a paired-bootstrap 95%% "
        "CI, wins/ties/losses, exact sign test), e.g. snapkv:keydiff; both must be in --methods. Every "
        "mixkv-X is compared with X automatically when both are run",
    )
    p.add_argument("--no-resume", action="store_true", help="recompute and overwrite finished cells")
    p.add_argument(
        "--resume-from",
        default=None,
        metavar="DIR",
        help="continue a published run: the per-example records of DIR/examples.csv (with DIR/run.json; "
        "several protocols: DIR/<protocol>/) become checkpoints, used only where the cell was computed "
        "with the same identity (model, dtype, seed, protocol, window; multimodal: the same task "
        "examples) and only where each example's digest matches",
    )
    p.add_argument(
        "--window-size",
        type=int,
        default=32,
        help="observation window (default 32; multimodal: at most half the budget, e.g. 16 at budget 32)",
    )
    p.add_argument(
        "--head-scores",
        default=None,
        help="multimodal: `mixkv calibrate` statistics file whose visual_head_scores the sparsemm methods use",
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the tasks' answer lengths")
    p.add_argument(
        "--no-shared-prefill",
        action="store_true",
        help="prefill every (method, budget) from scratch instead of copying one full-cache prefix per "
        "example (same computation up to float rounding, many times slower)",
    )
    p.add_argument(
        "--no-batched-decoding",
        action="store_true",
        help="decode every cell on its own instead of an example's mixkv cells (and the full cache) as one "
        "batch (same answers up to float rounding, slower)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="compute nothing: write results.md and the plots from the finished cells and the "
        "checkpoints of unfinished ones (a long run in progress; n per task in the headings)",
    )
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
    from mixkv.eval.mm_tasks import MM_TASKS
    from mixkv.eval.runner import run_eval

    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    tasks = split_list(args.tasks)
    try:
        if args.suite is not None:
            return _run_suite(args.suite, args.out, run_eval)
        if any(t in MM_TASKS for t in tasks):
            result = _run_multimodal(args, tasks)
        else:
            if args.data or args.images or args.head_scores:
                raise ValueError("--data / --images / --head-scores are for multimodal tasks only.")
            result = _run_text(args, run_eval)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mixkv eval: error: {exc}", file=sys.stderr)
        return 2
    if result.rank is not None and result.rank[0] != 0:
        print(
            f"rank {result.rank[0]} of {result.rank[1]}: its share of the examples is done; rank 0 wrote the files."
        )
        return 0
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


def _run_suite(name: str, out: str, run_eval: Any) -> int:
    """Run a fixed suite, write ``suite_scores.json`` and print it against the recorded reference."""
    import json
    from pathlib import Path

    from mixkv.eval.suites import SUITES, compare_with_reference, suite_scores

    suite = SUITES[name]
    result = run_eval(suite.model, out_dir=out, **suite.run_eval_kwargs())
    scores = suite_scores(result.cells)
    path = Path(out) / "suite_scores.json"
    path.write_text(json.dumps({"suite": name, "scores": scores}, indent=1) + "\n", encoding="utf-8")
    if result.table_path is not None:
        print(result.table_path.read_text(encoding="utf-8"))
    print("\n".join(compare_with_reference(name, scores)))
    print(f"scores: {path}")
    return 0


def _run_text(args: argparse.Namespace, run_eval: Any) -> Any:
    return run_eval(
        args.model,
        methods=split_list(args.methods),
        budgets=int_list(args.budgets, "--budgets"),
        tasks=split_list(args.tasks),
        context_lengths=int_list(args.context_lengths, "--context-lengths"),
        n=args.n,
        seed=args.seed,
        out_dir=args.out,
        protocol=split_list(args.protocol),
        resume=not args.no_resume,
        window_size=args.window_size,
        max_new_tokens=args.max_new_tokens,
        share_prefill=not args.no_shared_prefill,
        batch_decoding=not args.no_batched_decoding,
        dtype=args.dtype,
        compare=method_pairs(args.compare),
        report_only=args.report_only,
        resume_from=args.resume_from,
        device=checked_device(args.device),
    )


def _per_task(values: Sequence[str], flag: str, dataset_tasks: Sequence[str]) -> dict[str, str]:
    """``TASK=PATH`` entries, or one bare ``PATH`` when exactly one benchmark task is run."""
    from mixkv.eval.mm_tasks import DATASET_TASKS

    out: dict[str, str] = {}
    if values and not dataset_tasks:
        raise ValueError(f"{flag} is only for benchmark tasks ({', '.join(DATASET_TASKS)}); none is run.")
    for value in values:
        task, sep, path = value.partition("=")
        if sep and task.strip() in dataset_tasks:
            out[task.strip()] = path
        elif sep and task.strip() and "/" not in task and "\\" not in task:
            raise ValueError(
                f"{flag} {value}: {task!r} is not a benchmark task being run ({', '.join(dataset_tasks) or 'none'})."
            )
        elif len(dataset_tasks) == 1 and not out:
            out[dataset_tasks[0]] = value
        else:
            raise ValueError(
                f"{flag} {value}: with several benchmark tasks ({', '.join(dataset_tasks)}) give TASK=PATH "
                "for each."
            )
    return out


def _run_multimodal(args: argparse.Namespace, tasks: list[str]) -> Any:
    from pathlib import Path

    from mixkv.eval.mm_runner import run_mm_eval
    from mixkv.eval.mm_tasks import DATASET_TASKS, MM_TASKS, load_mm_task
    from mixkv.eval.tasks import TASKS

    text = [t for t in tasks if t in TASKS]
    unknown = [t for t in tasks if t not in TASKS and t not in MM_TASKS]
    if unknown:
        raise ValueError(
            f"Unknown task(s) {unknown}; multimodal tasks: {', '.join(MM_TASKS)}; text tasks: {', '.join(TASKS)}."
        )
    if text:
        raise ValueError(
            f"Text tasks {text} and multimodal tasks cannot be mixed in one run; run them separately "
            "(with different --out directories)."
        )
    if args.model is None:
        raise ValueError(
            "smollm2 (the default model) is a text-only model; multimodal tasks need a vision-language "
            "model: pass --model DIR."
        )
    benchmarks = [t for t in tasks if t in DATASET_TASKS]
    data = _per_task(args.data, "--data", benchmarks)
    images = _per_task(args.images, "--images", benchmarks)
    synthetic_dir = Path(args.out) / "synthetic_images"
    loaded = {}
    sources: dict[str, Any] = {}
    for task in dict.fromkeys(tasks):
        loaded[task] = load_mm_task(
            task,
            data=data.get(task),
            images=images.get(task),
            limit=args.n,
            seed=args.seed,
            synthetic_dir=synthetic_dir,
        )
        sources[task] = (
            {"data": data.get(task), "images": images.get(task)}
            if task in DATASET_TASKS
            else {"synthetic_seed": args.seed, "images": str(synthetic_dir)}
        )
    return run_mm_eval(
        args.model,
        loaded,
        methods=split_list(args.methods),
        budgets=int_list(args.budgets, "--budgets"),
        seed=args.seed,
        out_dir=args.out,
        resume=not args.no_resume,
        window_size=args.window_size,
        max_new_tokens=args.max_new_tokens,
        coordinate_scale=args.coordinate_scale,
        sources=sources,
        compare=method_pairs(args.compare),
        head_scores=args.head_scores,
        share_prefill=not args.no_shared_prefill,
        batch_decoding=not args.no_batched_decoding,
        report_only=args.report_only,
        resume_from=args.resume_from,
        device=checked_device(args.device),
    )


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
