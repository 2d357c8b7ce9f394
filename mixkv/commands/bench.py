"""``mixkv bench``: speed and memory of every method (:mod:`mixkv.benchmarks`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mixkv.benchmarks.bench_report import machine_info, markdown_table, write_results
from mixkv.benchmarks.random_models import RANDOM_MODELS, load_bench_model
from mixkv.benchmarks.timed_runs import DEFAULT_METHODS, memory_flat_check, run_bench
from mixkv.commands.parsing import checked_device, int_list, split_list
from mixkv.presses.registry import NAMES


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mixkv bench``: time the methods, check memory stays flat, write and print the results.

    Parameters
    ----------
    argv : Sequence[str], optional
        Command-line arguments (``sys.argv[1:]`` when None).

    Returns
    -------
    int
        Exit status, 0.
    """
    parser = argparse.ArgumentParser(prog="mixkv bench", description=__doc__)
    parser.add_argument(
        "--model",
        default="random-smollm2",
        help=f"{', '.join(RANDOM_MODELS)} (random weights; the first is the default), smollm2 (real "
        "weights) or a model directory",
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="random-* models: keep only the first N decoder layers"
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma list from {NAMES} (`mixkv presses` describes them)",
    )
    parser.add_argument("--context-lengths", default="1024,2048,4096")
    parser.add_argument("--budgets", default="128,512")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--window-size", type=int, default=32)
    parser.add_argument(
        "--prefill-chunk-sizes",
        default="0",
        help="comma list of prefill chunk sizes; 0 prefills in one go (e.g. 0,512,1024)",
    )
    parser.add_argument(
        "--decoding-intervals",
        default="0",
        help="comma list; N decodes under DecodingPress(press, interval=N), 0 with the plain press",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-check", type=int, default=10, help="consecutive generations (0: skip)")
    parser.add_argument(
        "--memory-check-context", type=int, default=1024, help="prompt tokens of those generations"
    )
    parser.add_argument("--memory-check-method", default="mixkv-adakv", help="press of those generations")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)

    try:
        lists = {
            name: int_list(getattr(args, name), "--" + name.replace("_", "-"))
            for name in (
                "context_lengths",
                "budgets",
                "batch_sizes",
                "prefill_chunk_sizes",
                "decoding_intervals",
            )
        }
        checked_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = load_bench_model(args.model, dtype, args.layers).to(args.device)
    rows = run_bench(
        model,
        methods=split_list(args.methods),
        context_lengths=lists["context_lengths"],
        budgets=lists["budgets"],
        batch_sizes=lists["batch_sizes"],
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        window_size=args.window_size,
        prefill_chunks=[n or None for n in lists["prefill_chunk_sizes"]],
        decoding_intervals=[n or None for n in lists["decoding_intervals"]],
        log=lambda s: print(s, flush=True),
    )
    mem = None
    if args.memory_check > 0:
        mem = memory_flat_check(
            model,
            method=args.memory_check_method,
            context=args.memory_check_context,
            budget=lists["budgets"][0],
            generations=args.memory_check,
            window_size=args.window_size,
        )
        print(f"memory check: {mem}", flush=True)
    command = "mixkv bench " + " ".join(sys.argv[1:] if argv is None else argv)
    paths = write_results(
        rows,
        Path(args.out),
        machine=machine_info(),
        command=command,
        memory_check=mem,
        plots=not args.no_plots,
    )
    print(markdown_table(rows))
    for k, p in paths.items():
        print(f"{k}: {p}")
    return 0
