"""A request stream served by continuous batching at a fixed cache size, with and without a press.

Run by ``mixkv bench-serving``. Every configuration (a method and a budget, or the full cache) serves
the same seeded requests through :class:`~mixkv.integration.continuous_batching.PressBatchingManager`
with the same paged cache (``num_blocks``, ``page_size``, ``max_batch_tokens``): all requests arrive
at once (an offline stream, so the cache is the limit from the first step), and after every engine
step a callback records the requests in flight (scheduled: being prefilled or decoded) and the pages
in use. Reported per configuration: requests in flight (max and time-weighted mean), pages in use at
peak and the cache bytes they hold, output tokens per second over the whole run, time to first token
(from arrival, so it includes queueing) and time per output token per request (p50/p95), wall time,
the process's peak RSS, and what compression kept and freed per request.

Prompts are slices of real text (standard-library docstring sentences, tokenized by the model's
tokenizer) at seeded lengths; their content does not matter for speed. Decoding is greedy with no
end-of-sequence token, so every request generates exactly ``new_tokens`` tokens.
"""

from __future__ import annotations

import random
import resource
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from mixkv.eval.haystack import stdlib_sentences
from mixkv.integration.continuous_batching import PressBatchingManager
from mixkv.presses.registry import build_press

__all__ = [
    "ServingSettings",
    "config_name",
    "corpus_tokens",
    "markdown_table",
    "prompt_lengths",
    "run_config",
    "synthetic_prompts",
]


@dataclass(frozen=True)
class ServingSettings:
    """The engine's sizing and the request stream, equal for every configuration.

    Attributes
    ----------
    cache_tokens : int
        Cache size in tokens, all requests together (``num_blocks * page_size``, rounded up to pages).
    page_size : int
        Tokens per page.
    max_batch_tokens : int
        Tokens per engine step (prefill chunks and decoded tokens together).
    new_tokens : int
        Tokens generated per request.
    window_size : int
        The presses' observation window.
    """

    cache_tokens: int
    page_size: int = 16
    max_batch_tokens: int = 512
    new_tokens: int = 64
    window_size: int = 32

    @property
    def num_blocks(self) -> int:
        return -(-self.cache_tokens // self.page_size)


def config_name(method: str, budget: int | None) -> str:
    """``"full"`` or ``"snapkv-128"``."""
    return method if method == "full" or budget is None else f"{method}-{budget}"


def corpus_tokens(tokenizer: Any, min_tokens: int) -> list[int]:
    """Token ids of standard-library prose, repeated until there are at least ``min_tokens``."""
    text = " ".join(stdlib_sentences())
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError("the tokenizer produced no tokens for the corpus")
    out = list(ids)
    while len(out) < min_tokens:
        out += ids
    return out


def prompt_lengths(requests: int, low: int, high: int, seed: int) -> list[int]:
    """Seeded prompt lengths, uniform in ``[low, high]``."""
    if not 1 <= low <= high:
        raise ValueError(f"prompt lengths need 1 <= low <= high, got {low} and {high}")
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(requests)]


def synthetic_prompts(tokens: Sequence[int], lengths: Sequence[int], seed: int) -> list[list[int]]:
    """One slice of ``tokens`` per length, at seeded offsets (``tokens`` must be longer than every length)."""
    rng = random.Random(seed + 1)
    longest = max(lengths, default=0)
    if len(tokens) <= longest:
        raise ValueError(f"{len(tokens)} corpus tokens cannot give a {longest}-token prompt")
    prompts = []
    for n in lengths:
        start = rng.randrange(0, len(tokens) - n)
        prompts.append(list(tokens[start : start + n]))
    return prompts


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _bytes_per_token(model: Any) -> int:
    """Cache bytes of one token (keys and values of every layer and KV head)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = next(model.parameters()).dtype
    return int(2 * config.num_hidden_layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size())


class _StepLog:
    """Step callback: time, requests in flight and pages in use after every engine step."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.times: list[float] = []
        self.in_flight: list[int] = []
        self.holding: list[int] = []
        self.pages: list[int] = []

    def __call__(self, manager: PressBatchingManager) -> None:
        usage = manager.page_usage()
        with self.lock:
            self.times.append(time.perf_counter())
            self.in_flight.append(len(usage.tokens))
            self.holding.append(len(usage.pages))
            self.pages.append(usage.in_use)

    def time_weighted_mean(self, values: list[int], start: float) -> float:
        """Each sample weighs the duration of the step that ended with it."""
        total, weighted, previous = 0.0, 0.0, start
        for t, value in zip(self.times, values, strict=True):
            weighted += value * (t - previous)
            total += t - previous
            previous = t
        return weighted / total if total > 0 else 0.0


def run_config(
    model: Any,
    prompts: Sequence[Sequence[int]],
    method: str,
    budget: int | None,
    settings: ServingSettings,
    *,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """Serve ``prompts`` (all arriving at once) under one press and measure the stream.

    Parameters
    ----------
    model : PreTrainedModel
        A full-attention decoder loaded with ``sdpa`` or ``eager`` attention.
    prompts : sequence of token-id lists
        The requests.
    method : str
        ``"full"`` or a registry name that continuous batching supports (``snapkv``, ``mixkv-snapkv``...).
    budget : int or None
        Kept entries per KV head (None for ``"full"``).
    settings : ServingSettings
        The cache and engine sizing, the same for every configuration.
    timeout : float
        Seconds to wait for the next result before giving up. Generous: under a press every request
        may be in flight at once, and then none finishes before the last few steps of the stream.

    Returns
    -------
    dict
        The measurements (see the module docstring); ``process_max_rss_bytes`` is the process's
        peak so far, meaningful when each configuration runs in its own process.

    Raises
    ------
    RuntimeError
        If a request fails or the engine stops before every request finished.
    """
    longest = max(len(p) for p in prompts)
    press = (
        None
        if method == "full"
        else build_press(method, budget, context_tokens=longest, window_size=settings.window_size)
    )
    gen = GenerationConfig(max_new_tokens=settings.new_tokens, do_sample=False, eos_token_id=-1)
    config = ContinuousBatchingConfig(
        page_size=settings.page_size,
        num_blocks=settings.num_blocks,
        max_batch_tokens=settings.max_batch_tokens,
    )
    log = _StepLog()
    manager = PressBatchingManager(model, press=press, generation_config=gen, batching_config=config)
    manager.add_step_callback(log)
    results: dict[str, Any] = {}
    with torch.no_grad(), manager:
        total_pages = manager.page_usage().total
        start = time.perf_counter()
        added = [
            manager.add_request(list(p), max_new_tokens=settings.new_tokens, record_timestamps=True)
            for p in prompts
        ]
        ids = [rid for rid in added if rid is not None]
        if len(ids) != len(prompts):
            raise RuntimeError(f"the engine refused {len(prompts) - len(ids)} of {len(prompts)} requests")
        while len(results) < len(ids):
            result = manager.get_result(timeout=timeout)
            if result is None:
                raise RuntimeError(
                    f"{len(ids) - len(results)} of {len(ids)} requests unfinished after {timeout} s"
                )
            if result.error is not None:
                raise RuntimeError(f"request {result.request_id} failed: {result.error}")
            if result.is_finished():
                results[result.request_id] = result
        end = time.perf_counter()
        records = [manager.compression_info(rid) for rid in ids]
    ttft, tpot, generated = [], [], 0
    for rid in ids:
        out = results[rid]
        stamps = out.timestamps or []
        generated += len(out.generated_tokens)
        if stamps:
            ttft.append(stamps[0] - out.created_time)
        if len(stamps) > 1:
            tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    kept = [r.kept_tokens for r in records if r is not None]
    freed = [r.freed_pages for r in records if r is not None]
    prompt_tokens = [len(p) for p in prompts]
    peak_pages = max(log.pages, default=0)
    per_token = _bytes_per_token(model)
    return {
        "config": config_name(method, budget),
        "method": method,
        "budget": budget,
        "requests": len(prompts),
        "finished": len(results),
        "prompt_tokens": sum(prompt_tokens),
        "kept_tokens": sum(kept),
        "mean_kept_per_request": statistics.fmean(kept) if kept else None,
        "freed_pages": sum(freed),
        "generated_tokens": generated,
        "steps": len(log.times),
        "wall_s": end - start,
        "output_tokens_per_s": generated / (end - start),
        "max_in_flight": max(log.in_flight, default=0),
        "mean_in_flight": log.time_weighted_mean(log.in_flight, start),
        "max_holding_pages": max(log.holding, default=0),
        "total_pages": total_pages,
        "peak_pages": peak_pages,
        "mean_pages": log.time_weighted_mean(log.pages, start),
        "bytes_per_token": per_token,
        "cache_bytes": total_pages * settings.page_size * per_token,
        "peak_cache_bytes_in_use": peak_pages * settings.page_size * per_token,
        "ttft_p50_s": _percentile(ttft, 0.5),
        "ttft_p95_s": _percentile(ttft, 0.95),
        "tpot_p50_s": _percentile(tpot, 0.5),
        "tpot_p95_s": _percentile(tpot, 0.95),
        "process_max_rss_bytes": _max_rss_bytes(),
        "settings": asdict(settings),
    }


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per configuration, in the given order."""
    header = (
        "| config | in flight max / mean | peak pages (of total) | peak cache in use | output tok/s | "
        "TTFT p50 / p95 (s) | TPOT p50 / p95 (ms) | wall (s) | peak RSS | kept / prompt tokens |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['max_in_flight']} / {r['mean_in_flight']:.1f} "
            f"| {r['peak_pages']} ({r['total_pages']}) | {r['peak_cache_bytes_in_use'] / 2**20:.0f} MiB "
            f"| {r['output_tokens_per_s']:.2f} | {_fmt(r['ttft_p50_s'], digits=1)} / {_fmt(r['ttft_p95_s'], digits=1)} "
            f"| {_fmt(r['tpot_p50_s'], 1000, 0)} / {_fmt(r['tpot_p95_s'], 1000, 0)} | {r['wall_s']:.0f} "
            f"| {r['process_max_rss_bytes'] / 2**20:.0f} MiB | {r['kept_tokens']} / {r['prompt_tokens']} |"
        )
    return "\n".join(lines)
