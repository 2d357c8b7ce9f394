"""What ``mixkv bench`` writes: the machine it ran on, ``bench.json``, ``bench.md`` and PNG plots."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mixkv.presses.registry import kvpress_available


def machine_info() -> dict[str, Any]:
    """The machine and software a benchmark ran on.

    Returns
    -------
    dict[str, Any]
        Platform, Python version, CPU model and count, torch threads, torch and transformers
        versions, CUDA device name (None without one) and whether kvpress is importable.
    """
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
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


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`~mixkv.benchmarks.timed_runs.run_bench` as a Markdown table.

    Parameters
    ----------
    rows : Sequence[dict[str, Any]]
        Benchmark rows.

    Returns
    -------
    str
        Header, separator and one line per row, ending with a newline.
    """
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
    """Legend name of a row's line: its method, prefill chunk size and decoding interval."""
    name = str(row["method"])
    if row.get("prefill_chunk"):
        name += f" chunk {row['prefill_chunk']}"
    if row.get("decoding_interval"):
        name += f" DecodingPress interval {row['decoding_interval']}"
    return name


def write_plots(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Plot prefill, decode, cache bytes and peak memory against context length, one panel per budget.

    Rows of the first row's batch size are plotted; a further plot shows the cache's bytes over the
    decode steps of the rows that sampled them more than once.

    Parameters
    ----------
    rows : Sequence[dict[str, Any]]
        Benchmark rows.
    out : Path
        Existing folder for the ``bench_*.png`` files.

    Returns
    -------
    list[Path]
        The files written; none when matplotlib is not installed.
    """
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
    """Write ``bench.json``, ``bench.md`` and (when ``plots``) the plots of a benchmark into ``out``.

    Parameters
    ----------
    rows : Sequence[dict[str, Any]]
        Benchmark rows.
    out : Path
        Output folder, created if missing.
    machine : dict[str, Any]
        :func:`machine_info` of the machine that ran it.
    command : str
        The command line, quoted in both files.
    memory_check : dict[str, Any], optional
        Result of :func:`~mixkv.benchmarks.timed_runs.memory_flat_check`.
    plots : bool
        Also write the PNG plots (when matplotlib is installed).

    Returns
    -------
    dict[str, Path]
        ``json``, ``markdown`` and ``plot0``, ``plot1``... -> the files written.
    """
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
