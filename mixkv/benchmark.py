"""Speed and memory benchmark of the presses (prefill, compression, decode, cache bytes, peak memory).

Run ``mixkv bench --help``. Every cell (method, context length, budget, batch size,
prefill chunk size, decoding interval) does ``repeats`` timed runs after ``warmup`` untimed ones;
each run is one prefill (in one go, or in chunks compressed as they arrive) followed by a manual
greedy decode loop of ``decode_tokens`` steps inside the press context (under
:class:`~mixkv.DecodingPress` when a decoding interval is given). Results go to ``bench.json``, ``bench.md`` and, when matplotlib is available, PNG plots.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from mixkv.integration import kv_cache_bytes
from mixkv.integration.decoder_layout import cache_argument, prefill, prefill_in_chunks
from mixkv.integration.kvpress_bridge import press_applied
from mixkv.presses.decoding import DecodingPress
from mixkv.presses.registry import NAMES, build_press, kvpress_available

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


# --------------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    """Current resident set size of this process (bytes)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is in the bench extra
        with contextlib.suppress(OSError, ValueError), open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return _max_rss_bytes()


def _max_rss_bytes() -> int:
    """Peak RSS of the process so far (``getrusage``; kilobytes on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _PeakMemory:
    """Peak memory during a block: CUDA ``max_memory_allocated`` on GPU, sampled RSS on CPU.

    ``ru_maxrss`` never goes down, so on CPU a background thread samples the RSS every few
    milliseconds; the larger of the sampled peak and the end RSS is reported.
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.peak = 0
        self._stop = False
        self._thread: Any = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import threading

            self.peak = _rss_bytes()
            self._stop = False

            def sample() -> None:
                while not self._stop:
                    self.peak = max(self.peak, _rss_bytes())
                    time.sleep(self.interval)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop = True
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


# -------------------------------------------------------------------------------------------- presses


def _cfg(model: torch.nn.Module) -> Any:
    config: Any = model.config
    return config.get_text_config()  # a VLM's language-model config


def _random_head_scores(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    cfg = _cfg(model)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(int(cfg.num_hidden_layers), int(cfg.num_attention_heads), generator=gen)


def make_press(method: str, model: torch.nn.Module, budget: int, context: int, window_size: int) -> Any:
    """The press of ``method`` for a ``context``-token prompt (None for ``"full"``); SparseMM-based
    methods get seeded random head scores (timing does not depend on their values)."""
    head_scores = _random_head_scores(model) if "sparsemm" in method else None
    return build_press(
        method, budget, context_tokens=context, window_size=window_size, head_scores=head_scores
    )


# ------------------------------------------------------------------------------------------ benchmark


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _param_info(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _head_dim(model: torch.nn.Module) -> int:
    cfg = _cfg(model)
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else int(cfg.hidden_size // cfg.num_attention_heads)


#: Decode steps between two samples of the cache's bytes (``kv_bytes_over_decode``).
KV_SAMPLE_STEPS = 16


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
    device, dtype = _param_info(model)
    batch, context = input_ids.shape
    elem = torch.empty((), dtype=dtype).element_size()
    n_layers = int(_cfg(model).num_hidden_layers)
    n_kv = int(getattr(_cfg(model), "num_key_value_heads", None) or _cfg(model).num_attention_heads)
    cache = DynamicCache(config=_cfg(model))
    out: dict[str, Any] = {}
    if prefill_chunk is not None and press is not None and not hasattr(press, "last_report"):
        raise ValueError("chunked prefill is measured for mixkv presses and the full cache only")
    with (
        _PeakMemory(device) as mem,
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
    """Time every (method, context, budget, batch, prefill chunk, decoding interval) cell; one dict
    per cell.

    ``"full"`` ignores the budget and the decoding interval and is run once per (context, batch,
    chunk). A prefill chunk of None prefills in one go; a decoding interval of None decodes with
    the plain press, an integer under ``DecodingPress(press, interval=...)``. Methods named
    ``kvpress-*`` are skipped when kvpress is not importable (and with chunks or intervals).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    model.eval()
    device, _ = _param_info(model)
    vocab = int(_cfg(model).vocab_size)
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
    prefill = [r["prefill_s"] for r in runs]
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
        "prefill_s_median": statistics.median(prefill),
        "prefill_s_min": min(prefill),
        "prefill_s_max": max(prefill),
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
    """Run ``generations`` consecutive compressed generations; flag RSS growth above ``tolerance``.

    The default method is head-wise (packed layers), which carries the most bookkeeping."""
    device, _ = _param_info(model)
    ids = torch.randint(
        0, int(_cfg(model).vocab_size), (1, context), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to(device)
    press = make_press(method, model, budget, context, window_size)
    _one_run(model, press, ids, budget, decode_tokens)  # warm-up (allocator pools, lazy init)
    gc.collect()
    before = _rss_bytes() if device.type != "cuda" else int(torch.cuda.memory_allocated(device))
    for _ in range(generations):
        _one_run(model, press, ids, budget, decode_tokens)
    gc.collect()
    after = _rss_bytes() if device.type != "cuda" else int(torch.cuda.memory_allocated(device))
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


# ---------------------------------------------------------------------------------------------- model


#: Randomly initialised models for timing (it needs no trained weights): name -> (family, shape).
#: ``random-smollm2`` is SmolLM2-135M's shape; ``random-llama3-1b`` Llama-3.2-1B's; ``random-qwen2vl-2b``
#: Qwen2-VL-2B's language model (M-RoPE) with a one-block vision tower, fed text tokens only: image
#: tokens cost the decoder the same as text ones once embedded; ``random-qwen2.5-0.5b``
#: Qwen2.5-0.5B's (32k context).
RANDOM_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "random-smollm2": (
        "llama",
        {
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
        },
    ),
    "random-llama3-1b": (
        "llama",
        {
            "vocab_size": 128256,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
        },
    ),
    "random-qwen2.5-0.5b": (
        "qwen2",
        {
            "vocab_size": 151936,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "max_position_embeddings": 32768,
        },
    ),
    "random-qwen2vl-2b": (
        "qwen2_vl",
        {
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [16, 24, 24],
            },
        },
    ),
}


def random_model(
    name: str, dtype: torch.dtype = torch.float32, layers: int | None = None, seed: int = 0
) -> torch.nn.Module:
    """A randomly initialised model of :data:`RANDOM_MODELS`, optionally cut to its first ``layers``
    decoder layers (timing per layer is unchanged; the whole model may not fit a CPU's time)."""
    import transformers as tf

    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; choose from {sorted(RANDOM_MODELS)}")
    family, shape = RANDOM_MODELS[name]
    if layers is not None:
        if not 1 <= layers <= shape["num_hidden_layers"]:
            raise ValueError(f"layers must be in [1, {shape['num_hidden_layers']}] for {name}, got {layers}")
        shape = {**shape, "num_hidden_layers": layers}
    text = {"max_position_embeddings": 65536, **shape, "tie_word_embeddings": True}
    config: Any
    cls: Any
    if family == "llama":
        config, cls = tf.LlamaConfig(**text), tf.LlamaForCausalLM
    elif family == "qwen2":
        config, cls = tf.Qwen2Config(**text), tf.Qwen2ForCausalLM
    else:
        vision = {"depth": 1, "embed_dim": 32, "hidden_size": shape["hidden_size"], "num_heads": 2}
        config = tf.Qwen2VLConfig(
            text_config=tf.Qwen2VLTextConfig(**text).to_dict(), vision_config=vision, tie_word_embeddings=True
        )
        cls = tf.Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    model: Any = cls._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def load_bench_model(
    name: str, dtype: torch.dtype = torch.float32, layers: int | None = None
) -> torch.nn.Module:
    if name in RANDOM_MODELS:
        return random_model(name, dtype, layers)
    if layers is not None:
        raise ValueError("--layers only applies to the random-* models")
    from mixkv.model_loading import load_model

    model, _ = load_model(None if name == "smollm2" else name, dtype=dtype)
    return model


# ---------------------------------------------------------------------------------------------- output


def machine_info() -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "kvpress": kvpress_available(),
    }
    return info


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        "| method | ctx | budget | batch | chunk | dec. interval | prefill s (med [min-max]) | compress s "
        "| decode ms/tok | tok/s | KV MiB | kept MiB | KV/kept | peak RSS MiB |\n"
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        chunk, interval = r.get("prefill_chunk"), r.get("decoding_interval")
        lines.append(
            f"| {r['method']} | {r['context']} | {r['budget'] if r['budget'] is not None else '-'} | {r['batch']} "
            f"| {chunk or '-'} | {interval or '-'} "
            f"| {r['prefill_s_median']:.3f} [{r['prefill_s_min']:.3f}-{r['prefill_s_max']:.3f}] "
            f"| {r['compression_s_median']:.3f} | {r['decode_ms_per_token']:.2f} | {r['decode_tokens_per_s']:.1f} "
            f"| {_mib(r['kv_bytes'])} | {_mib(r['kept_bytes'])} | {r['kv_over_kept']:.3f} "
            f"| {_mib(r['peak_mem_bytes'])} |"
        )
    return head + "\n".join(lines) + "\n"


def _series(row: dict[str, Any]) -> str:
    name = str(row["method"])
    if row.get("prefill_chunk"):
        name += f" chunk {row['prefill_chunk']}"
    if row.get("decoding_interval"):
        name += f" DecodingPress interval {row['decoding_interval']}"
    return name


def write_plots(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    metrics = [
        ("prefill_s_median", "prefill (s)", "prefill"),
        ("decode_ms_per_token", "decode (ms / token)", "decode"),
        ("kv_bytes", "KV cache (bytes)", "kv_bytes"),
        ("peak_mem_bytes", "peak memory (bytes)", "peak_mem"),
    ]
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None}) or [None]
    for key, label, stem in metrics:
        fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
        # One line per method, prefill chunk size and decoding interval.
        series = dict.fromkeys(_series(r) for r in rows)
        for ax, budget in zip(axes[0], budgets, strict=True):
            for i, name in enumerate(series):
                pts = sorted(
                    (r["context"], r[key])
                    for r in rows
                    if _series(r) == name
                    and r["batch"] == rows[0]["batch"]
                    and (r["budget"] == budget or r["budget"] is None)
                )
                if pts:
                    # 20 colours: more than 10 methods stay distinguishable
                    color = plt.get_cmap("tab20")(i % 20)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=color)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length")
            ax.set_ylabel(label)
            ax.set_title(f"budget {budget}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"bench_{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    decoding = [r for r in rows if len(r.get("kv_bytes_over_decode", ())) > 2]
    if decoding:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, r in enumerate(decoding):
            steps, held = zip(*r["kv_bytes_over_decode"], strict=True)
            label = f"{_series(r)}, ctx {r['context']}, budget {r['budget']}"
            ax.plot(steps, [b / 2**20 for b in held], label=label, color=plt.get_cmap("tab20")(i % 20))
        ax.set_xlabel("generated tokens")
        ax.set_ylabel("KV cache (MiB)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "bench_kv_over_decode.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_results(
    rows: Sequence[dict[str, Any]],
    out: Path,
    *,
    machine: dict[str, Any],
    command: str,
    memory_check: dict[str, Any] | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "machine": machine, "results": list(rows), "memory_check": memory_check}
    paths = {"json": out / "bench.json", "markdown": out / "bench.md"}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str))
    md = [f"Command: `{command}`\n", "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()) + "\n"]
    md.append(markdown_table(rows))
    if memory_check is not None:
        mc = memory_check
        md.append(
            f"\nMemory stays flat: {mc['generations']} x {mc['method']} (ctx {mc['context']}, budget "
            f"{mc['budget']}): {_mib(mc['mem_before_bytes'])} -> {_mib(mc['mem_after_bytes'])} MiB "
            f"({mc['growth'] * 100:+.1f}%) {'OK' if mc['flat'] else 'GROWTH > 5%'}\n"
        )
    paths["markdown"].write_text("\n".join(md))
    if plots:
        for i, p in enumerate(write_plots(rows, out)):
            paths[f"plot{i}"] = p
    return paths
