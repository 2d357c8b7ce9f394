"""``mixkv bench-serving``: a request stream at a fixed cache size, full cache vs presses (:mod:`mixkv.benchmarks.serving_load`)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mixkv.benchmarks.bench_report import machine_info
from mixkv.benchmarks.serving_load import (
    ServingSettings,
    config_name,
    corpus_tokens,
    markdown_table,
    prompt_lengths,
    run_config,
    synthetic_prompts,
)
from mixkv.commands.parsing import int_list, split_list

DESCRIPTION = """\
Serve REQUESTS seeded prompts (all arriving at once) with continuous batching over one paged cache of
--cache-tokens tokens, once per configuration: the full cache, then every method at every budget. Every
configuration gets the same prompts, cache pages, page size and tokens per step. Writes
OUT/config-NAME.json per configuration (each in its own process unless --no-isolate, so that its peak
RSS is its own), then OUT/serving.json and OUT/serving.md. --report rebuilds the last two from the
config files already in OUT."""


def build_parser() -> argparse.ArgumentParser:
    """The ``mixkv bench-serving`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="mixkv bench-serving",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2", help="smollm2, qwen2.5-coder-0.5b or a model directory")
    parser.add_argument("--methods", nargs="+", default=["snapkv,mixkv-snapkv"], help="presses besides full")
    parser.add_argument("--budgets", nargs="+", default=["128,512"], help="kept tokens per KV head")
    parser.add_argument("--no-full", action="store_true", help="skip the full-cache configuration")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument(
        "--prompt-tokens", default="2048,8192", help="LOW,HIGH: prompt lengths, uniform in [LOW, HIGH]"
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument(
        "--cache-tokens",
        type=int,
        default=None,
        help="cache size in tokens (default: 8 full requests of the mean length, prompt plus answer)",
    )
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--window-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-serving"))
    parser.add_argument("--no-isolate", action="store_true", help="run every configuration in this process")
    parser.add_argument("--report", action="store_true", help="only rebuild serving.json/md from OUT")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one configuration (a child run)
    return parser


def _configs(args: argparse.Namespace) -> list[tuple[str, int | None]]:
    budgets = int_list(args.budgets, "--budgets")
    configs: list[tuple[str, int | None]] = [] if args.no_full else [("full", None)]
    configs += [
        (method, budget) for budget in budgets for method in split_list(args.methods) if method != "full"
    ]
    return configs


def _settings(args: argparse.Namespace, low: int, high: int) -> ServingSettings:
    cache = args.cache_tokens if args.cache_tokens is not None else 8 * ((low + high) // 2 + args.new_tokens)
    if cache < high + args.new_tokens:
        raise ValueError(
            f"--cache-tokens {cache} cannot hold the longest request ({high} + {args.new_tokens} tokens)"
        )
    return ServingSettings(
        cache_tokens=cache,
        page_size=args.page_size,
        max_batch_tokens=args.max_batch_tokens,
        new_tokens=args.new_tokens,
        window_size=args.window_size,
    )


def _run_one(
    args: argparse.Namespace, method: str, budget: int | None, settings: ServingSettings, low: int, high: int
) -> dict[str, Any]:
    from mixkv.model_loading import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    lengths = prompt_lengths(args.requests, low, high, args.seed)
    prompts = synthetic_prompts(corpus_tokens(tokenizer, 2 * high), lengths, args.seed)
    row = run_config(model, prompts, method, budget, settings)
    row["model"] = args.model
    row["dtype"] = args.dtype
    row["prompt_range"] = [low, high]
    row["seed"] = args.seed
    row["machine"] = machine_info()
    return row


def _write_report(out: Path, names: Sequence[str] | None) -> list[dict[str, Any]]:
    files = sorted(out.glob("config-*.json"))
    rows = [json.loads(f.read_text()) for f in files]
    if names is not None:
        order = {name: i for i, name in enumerate(names)}
        rows = sorted((r for r in rows if r["config"] in order), key=lambda r: order[r["config"]])
    (out / "serving.json").write_text(json.dumps(rows, indent=2))
    table = markdown_table(rows)
    (out / "serving.md").write_text(table + "\n")
    print(table)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mixkv bench-serving``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        low, high = int_list(args.prompt_tokens, "--prompt-tokens")
    except ValueError:
        print(
            f"mixkv bench-serving: --prompt-tokens takes LOW,HIGH, got {args.prompt_tokens!r}",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    configs = _configs(args)
    names = [config_name(m, b) for m, b in configs]
    if args.report:
        _write_report(args.out, names)
        return 0
    try:
        settings = _settings(args, low, high)
    except ValueError as exc:
        print(f"mixkv bench-serving: {exc}", file=sys.stderr)
        return 2
    if args.only is not None:
        method, _, budget = args.only.partition(":")
        configs = [(method, int(budget) if budget else None)]
    for method, budget in configs:
        name = config_name(method, budget)
        target = args.out / f"config-{name}.json"
        started = time.perf_counter()
        if args.no_isolate or args.only is not None:
            row = _run_one(args, method, budget, settings, low, high)
            target.write_text(json.dumps(row, indent=2))
        else:
            child = [a for a in (sys.argv[1:] if argv is None else list(argv)) if a != "--no-isolate"]
            if argv is None and child and child[0] == "bench-serving":
                child = child[1:]
            spec = f"{method}:{budget}" if budget is not None else method
            cmd = [sys.executable, "-m", "mixkv", "bench-serving", *child, "--only", spec]
            if subprocess.run(cmd, check=False).returncode != 0:
                print(f"mixkv bench-serving: configuration {name} failed", file=sys.stderr)
                return 1
        if args.only is None:
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    if args.only is None:
        _write_report(args.out, names)
    return 0
