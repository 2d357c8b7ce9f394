"""Timed runs of the presses: one cell per (method, context, budget, batch, prefill chunk, interval).

Every cell does ``repeats`` timed runs after ``warmup`` untimed ones; each run is one prefill (in
one go, or in chunks compressed as they arrive) followed by a manual greedy decode loop of
``decode_tokens`` steps inside the press context (under :class:`~mixkv.DecodingPress` when a
decoding interval is given). :func:`memory_flat_check` reruns one press to show that consecutive
generations do not accumulate memory.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from mixkv.benchmarks.peak_memory import PeakMemory, rss_bytes
from mixkv.integration.cache import kv_cache_bytes
from mixkv.integration.decoder_layout import cache_argument, prefill, prefill_in_chunks
from mixkv.integration.kvpress_bridge import press_applied
from mixkv.presses.decoding import DecodingPress
from mixkv.presses.registry import NAMES, build_press, kvpress_available

#: Keys of every row :func:`run_bench` returns (beside ``repeats`` and ``decode_tokens``).
FIELDS = (
    "method",
    "context",
    "budget",
    "batch",
    "prefill_chunk",
    "decoding_interval",
    "prefill_s_median",
    "prefill_s_min",
    "prefill_s_max",
    "compression_s_median",
    "decode_s_per_token",
    "decode_ms_per_token",
    "decode_tokens_per_s",
    "decode_steps_timed",
    "kv_bytes",
    "kept_entries",
    "kept_bytes",
    "kv_over_kept",
    "peak_mem_bytes",
    "kv_bytes_over_decode",
)
DEFAULT_METHODS = ("full", "snapkv", "mixkv-snapkv", "adakv", "mixkv-adakv", "streamingllm")

#: Decode steps between two samples of the cache's bytes (``kv_bytes_over_decode``).
KV_SAMPLE_STEPS = 16


def _text_config(model: torch.nn.Module) -> Any:
    config: Any = model.config
    return config.get_text_config()  # a VLM's language-model config


def _random_head_scores(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    text_config = _text_config(model)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(
        int(text_config.num_hidden_layers), int(text_config.num_attention_heads), generator=generator
    )


def make_press(method: str, model: torch.nn.Module, budget: int, context: int, window_size: int) -> Any:
    """The press of ``method`` for a ``context``-token prompt.

    Parameters
    ----------
    method : str
        A name of :data:`mixkv.presses.registry.NAMES`.
    model : torch.nn.Module
        The model it will be applied to (its shape sizes the head scores).
    budget, context, window_size : int
        Kept entries per head, prompt tokens and observation window.

    Returns
    -------
    Any
        The press, or None for ``"full"``. SparseMM-based methods get seeded random head scores:
        timing does not depend on their values.
    """
    head_scores = _random_head_scores(model) if "sparsemm" in method else None
    return build_press(
        method, budget, context_tokens=context, window_size=window_size, head_scores=head_scores
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _param_info(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _head_dim(model: torch.nn.Module) -> int:
    text_config = _text_config(model)
    hd = getattr(text_config, "head_dim", None)
    return int(hd) if hd else int(text_config.hidden_size // text_config.num_attention_heads)


def _prefill(
    model: torch.nn.Module, session: Any, input_ids: torch.Tensor, cache: Any, chunk: int | None
) -> Any:
    """Prefill in one go, or ``chunk`` tokens per forward (compressed as they arrive under a press)."""
    if chunk is None or chunk >= input_ids.shape[1]:
        return prefill(model, input_ids, cache)
    return prefill_in_chunks(model, input_ids, cache, chunk, session)


def _one_run(
    model: torch.nn.Module,
    press: Any,
    input_ids: torch.Tensor,
    budget: int,
    decode_tokens: int,
    prefill_chunk: int | None = None,
) -> dict[str, Any]:
    """One prefill and ``decode_tokens`` greedy steps under ``press``: their times, bytes and peak."""
    device, dtype = _param_info(model)
    batch, context = input_ids.shape
    elem = torch.empty((), dtype=dtype).element_size()
    text_config = _text_config(model)
    n_layers = int(text_config.num_hidden_layers)
    n_kv = int(getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads)
    cache = DynamicCache(config=text_config)
    out: dict[str, Any] = {}
    if prefill_chunk is not None and press is not None and not hasattr(press, "last_report"):
        raise ValueError("chunked prefill is measured for mixkv presses and the full cache only")
    with (
        PeakMemory(device) as mem,
        torch.inference_mode(),
        press_applied(press, model) as session,
    ):
        _sync(device)
        t0 = time.perf_counter()
        logits = _prefill(model, session, input_ids, cache, prefill_chunk)
        _sync(device)
        out["prefill_s"] = time.perf_counter() - t0
        report = getattr(press, "last_report", None) if press is not None else None
        kv_bytes = kv_cache_bytes(cache)
        if report is not None and getattr(report, "kept_tokens", None) is not None:
            kept = int(report.kept_tokens.sum())
            out["compression_s"] = float(report.compression_seconds)
        elif press is not None:  # kvpress: it keeps `budget` entries per head (whatever it stores)
            kept = batch * n_layers * n_kv * min(budget, context)
            out["compression_s"] = float("nan")  # kvpress does not report it
        else:
            kept = batch * n_layers * n_kv * context
            out["compression_s"] = 0.0
        out["kv_bytes"] = kv_bytes
        out["kept_entries"] = kept
        out["kept_bytes"] = kept * 2 * _head_dim(model) * elem
        next_ids = logits.argmax(-1, keepdim=True)
        steps: list[float] = []
        kv_over_decode = [[0, kv_bytes]]
        step_kwargs = {cache_argument(model): cache, "use_cache": True}  # resolved once, not per timed step
        for step in range(1, decode_tokens + 1):
            _sync(device)
            t0 = time.perf_counter()
            logits = model(next_ids, **step_kwargs).logits
            next_ids = logits[:, -1:].argmax(-1)
            _sync(device)
            steps.append(time.perf_counter() - t0)
            if step % KV_SAMPLE_STEPS == 0 or step == decode_tokens:
                kv_over_decode.append([step, kv_cache_bytes(cache)])
        out["decode_steps"] = steps
        out["kv_bytes_over_decode"] = kv_over_decode
    out["peak_mem_bytes"] = mem.peak
    del cache
    return out


def run_bench(
    model: torch.nn.Module,
    *,
    methods: Sequence[str],
    context_lengths: Sequence[int],
    budgets: Sequence[int],
    batch_sizes: Sequence[int],
    decode_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    window_size: int = 32,
    seed: int = 0,
    prefill_chunks: Sequence[int | None] = (None,),
    decoding_intervals: Sequence[int | None] = (None,),
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every (method, context, budget, batch, prefill chunk, decoding interval) cell.

    ``"full"`` ignores the budget and the decoding interval and is run once per (context, batch,
    chunk). Methods named ``kvpress-*`` are skipped when kvpress is not importable, and are run
    without chunks or intervals.

    Parameters
    ----------
    model : torch.nn.Module
        The model to time (put in eval mode).
    methods : Sequence[str]
        Names of :data:`mixkv.presses.registry.NAMES`.
    context_lengths, budgets, batch_sizes : Sequence[int]
        Prompt tokens, kept entries per head and rows of the cells.
    decode_tokens : int
        Greedy decode steps of a timed run.
    repeats, warmup : int
        Timed and untimed runs per cell.
    window_size : int
        Observation window of the presses.
    seed : int
        Seed of the random prompts.
    prefill_chunks : Sequence[int or None]
        Prefill chunk sizes; None prefills in one go.
    decoding_intervals : Sequence[int or None]
        None decodes with the plain press, an integer under ``DecodingPress(press, interval=...)``.
    log : callable, optional
        Called with one line per finished cell.

    Returns
    -------
    list[dict[str, Any]]
        One row per cell with the keys of :data:`FIELDS`, ``repeats`` and ``decode_tokens``.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    model.eval()
    device, _ = _param_info(model)
    vocab = int(_text_config(model).vocab_size)
    have_kvpress = kvpress_available()
    rows: list[dict[str, Any]] = []
    # One short untimed run first so lazy initialisation never lands in the first timed cell.
    warm_ids = torch.randint(
        0, vocab, (1, min(context_lengths)), generator=torch.Generator().manual_seed(seed)
    )
    _one_run(model, None, warm_ids.to(device), budgets[0], 2)
    for method in methods:
        if method not in NAMES:
            raise ValueError(f"unknown method {method!r}; choose from {NAMES}")
        if method.startswith("kvpress-") and not have_kvpress:
            if log:
                log(f"skip {method}: kvpress is not installed")
            continue
        foreign = method.startswith("kvpress-")
        cells = [
            (context, budget, batch, chunk, interval)
            for context in context_lengths
            for budget in ([budgets[0]] if method == "full" else budgets)
            for batch in batch_sizes
            for chunk in ([None] if foreign else prefill_chunks)
            for interval in ([None] if method == "full" or foreign else decoding_intervals)
        ]
        for context, budget, batch, chunk, interval in cells:
            gen = torch.Generator().manual_seed(seed + context + batch)
            ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
            press = make_press(method, model, budget, context, window_size)
            if interval is not None:
                press = DecodingPress(press, interval=interval)
            for _ in range(warmup):
                _one_run(model, press, ids, budget, min(decode_tokens, 4), chunk)
            runs = []
            for _ in range(repeats):
                gc.collect()
                runs.append(_one_run(model, press, ids, budget, decode_tokens, chunk))
            rows.append(_summarise(method, context, budget, batch, decode_tokens, runs))
            rows[-1]["prefill_chunk"] = chunk
            rows[-1]["decoding_interval"] = interval
            if log:
                r = rows[-1]
                log(
                    f"{method:>16} ctx={context:<6} budget={r['budget']!s:<5} batch={batch} chunk={chunk} "
                    f"interval={interval} prefill={r['prefill_s_median']:.3f}s "
                    f"decode={r['decode_ms_per_token']:.2f}ms/tok kv={r['kv_bytes'] / 2**20:.1f}MiB "
                    f"ratio={r['kv_over_kept']:.3f} peak={r['peak_mem_bytes'] / 2**20:.0f}MiB"
                )
    return rows


def _summarise(
    method: str, context: int, budget: int, batch: int, decode_tokens: int, runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """One cell's row from its timed runs: medians and extremes of the times, the last run's bytes."""
    prefill_times = [r["prefill_s"] for r in runs]
    comp = [r["compression_s"] for r in runs]
    steps = [s for r in runs for s in r["decode_steps"]]
    step_med = statistics.median(steps) if steps else float("nan")
    kv_bytes = runs[-1]["kv_bytes"]
    kept_bytes = runs[-1]["kept_bytes"]
    return {
        "method": method,
        "context": context,
        "budget": None if method == "full" else budget,
        "batch": batch,
        "repeats": len(runs),
        "decode_tokens": decode_tokens,
        "prefill_s_median": statistics.median(prefill_times),
        "prefill_s_min": min(prefill_times),
        "prefill_s_max": max(prefill_times),
        "compression_s_median": statistics.median(comp),
        "decode_s_per_token": step_med,
        "decode_ms_per_token": step_med * 1e3,
        "decode_tokens_per_s": batch / step_med if step_med > 0 else float("nan"),
        "decode_steps_timed": len(steps),
        "kv_bytes": kv_bytes,
        "kept_entries": runs[-1]["kept_entries"],
        "kept_bytes": kept_bytes,
        "kv_over_kept": kv_bytes / kept_bytes if kept_bytes else float("nan"),
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in runs),
        "kv_bytes_over_decode": runs[-1]["kv_bytes_over_decode"],
    }


def memory_flat_check(
    model: torch.nn.Module,
    *,
    method: str = "mixkv-adakv",
    context: int = 1024,
    budget: int = 128,
    generations: int = 10,
    decode_tokens: int = 16,
    window_size: int = 32,
    tolerance: float = 0.05,
) -> dict[str, Any]:
    """Run ``generations`` consecutive compressed generations and flag memory growth.

    The default method is head-wise (packed layers), which carries the most bookkeeping.

    Parameters
    ----------
    model : torch.nn.Module
        The model to run.
    method : str
        The press of the generations.
    context, budget, decode_tokens, window_size : int
        Prompt tokens, kept entries per head, greedy steps and observation window.
    generations : int
        Generations after one warm-up generation.
    tolerance : float
        Largest relative growth still called flat.

    Returns
    -------
    dict[str, Any]
        The settings, ``mem_before_bytes`` and ``mem_after_bytes`` (RSS on CPU, allocated bytes
        on CUDA), their relative ``growth`` and ``flat`` (growth at most ``tolerance``).
    """
    device, _ = _param_info(model)
    ids = torch.randint(
        0, int(_text_config(model).vocab_size), (1, context), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to(device)
    press = make_press(method, model, budget, context, window_size)
    _one_run(model, press, ids, budget, decode_tokens)  # warm-up (allocator pools, lazy init)
    gc.collect()
    before = rss_bytes() if device.type != "cuda" else int(torch.cuda.memory_allocated(device))
    for _ in range(generations):
        _one_run(model, press, ids, budget, decode_tokens)
    gc.collect()
    after = rss_bytes() if device.type != "cuda" else int(torch.cuda.memory_allocated(device))
    growth = (after - before) / before if before else 0.0
    return {
        "method": method,
        "context": context,
        "budget": budget,
        "generations": generations,
        "decode_tokens": decode_tokens,
        "mem_before_bytes": before,
        "mem_after_bytes": after,
        "growth": growth,
        "flat": growth <= tolerance,
    }
