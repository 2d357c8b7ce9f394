"""Resumable evaluation grid: methods x budgets x tasks x context lengths.

Each *cell* (method, budget, task, context length) runs ``n`` seeded examples of a task from
:mod:`mixkv.eval.tasks`. For every example the prompt is prefilled once with the press active
(that is when the cache is compressed) and the answer is decoded greedily from the compressed
cache. A finished cell is written as one JSON file, atomically, in ``out_dir/cells``; on resume
finished cells are read back instead of recomputed. Within a cell every finished example is
checkpointed (``cells/.<name>.partial``), so an interrupted run resumes after the last finished
example, not at the start of the cell; a checkpoint is used only for the same run (identity) and
only as far as its examples' contexts match the regenerated ones. A cell file that cannot be read or does not
match the run (corrupt, truncated, other seed, other model...) is reported, kept aside as
``<name>.json.corrupt`` (or ``.stale``) and recomputed; it is never used silently.

Protocols
---------
``"query_agnostic"`` (default)
    Only the context is prefilled and compressed; the question arrives afterwards and is fed
    through the compressed cache. The press cannot know what will be asked.
``"query_aware"``
    The whole prompt (context and question, except its last token) is prefilled and compressed,
    so the observation window contains the question, as in the SnapKV / MixKV papers.

Budgets at least as large as a cell's context length are skipped with a message (the press
would keep everything, so the cell would only repeat the full-cache result); the summary table
shows them as ``n/a``. A grid in which every compressed cell would be skipped is an error.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.metadata as md
import inspect
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixkv.eval.stats_tables import (
    CORPUS_NOTE,
    format_average,
    format_score,
    mixkv_base_pairs,
    paired_lines,
    sample_sizes,
)
from mixkv.eval.tasks import TASKS, TextExample, encode_prompt, make_examples, score_output
from mixkv.integration.cache import kv_cache_bytes
from mixkv.integration.models import cache_argument, prefill
from mixkv.presses.registry import KVPRESS_NAMES, NAMES, build_press, kvpress_available

__all__ = [
    "KVPRESS_METHODS",
    "METHODS",
    "EvalResult",
    "SharedPrefix",
    "build_press",
    "cell_filename",
    "prefill_shared_prefix",
    "run_eval",
    "run_example",
    "write_markdown_table",
]

logger = logging.getLogger("mixkv.eval")

#: Bump when the content of generated examples or cell files changes incompatibly.
SCHEMA_VERSION = 1

#: Methods backed by NVIDIA's ``kvpress`` package (only when it is importable).
KVPRESS_METHODS: tuple[str, ...] = KVPRESS_NAMES

#: Every method name :func:`run_eval` accepts (the press registry's names).
METHODS: tuple[str, ...] = NAMES

PROTOCOLS = ("query_agnostic", "query_aware")


# --------------------------------------------------------------------------------------------
# One example


@dataclass(frozen=True)
class SharedPrefix:
    """The full cache of an example's first ``tokens`` prefill tokens, computed once and copied
    into every method's run (see :func:`prefill_shared_prefix`). Never modified."""

    cache: Any
    tokens: int
    seconds: float


def _prompt_ids(
    example: TextExample, tokenizer: Any, protocol: str, device: torch.device
) -> tuple[torch.Tensor, int]:
    """The whole prompt ``(1, N)`` and how many of its tokens are prefilled under ``protocol``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    context_ids, question_ids = encode_prompt(example, tokenizer)
    ids = torch.tensor([context_ids + question_ids], dtype=torch.long, device=device)
    return ids, len(context_ids) if protocol == "query_agnostic" else ids.shape[1] - 1


def prefill_shared_prefix(
    model: Any, tokenizer: Any, example: TextExample, *, protocol: str, tail_tokens: int
) -> SharedPrefix | None:
    """Prefill all but the last ``tail_tokens`` prefill tokens of an example with the full cache.

    Every method then copies this cache and prefills only the tail under its press, which
    compresses prefix and tail together exactly as it would a one-go prefill (the scores only need
    the tail's last ``window_size`` queries). The prompt's long prefix is thus computed once per
    example instead of once per (method, budget). None when the prefill is not longer than the
    tail.
    """
    from transformers import DynamicCache

    ids, n_prefill = _prompt_ids(example, tokenizer, protocol, model.device)
    tokens = n_prefill - tail_tokens
    if tokens < 1:
        return None
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        start = time.perf_counter()
        prefill(model, ids[:, :tokens], cache)
        seconds = time.perf_counter() - start
    return SharedPrefix(cache, tokens, seconds)


def run_example(
    model: Any,
    tokenizer: Any,
    example: TextExample,
    press: Any | None,
    *,
    protocol: str = "query_agnostic",
    max_new_tokens: int | None = None,
    prefix: SharedPrefix | None = None,
) -> dict[str, Any]:
    """Prefill one example (compressing with ``press``), decode the answer and score it.

    Parameters
    ----------
    model, tokenizer
        A causal LM and its tokenizer.
    example
        The example.
    press
        A press, or None for the full cache.
    protocol
        ``"query_agnostic"`` or ``"query_aware"`` (see the module documentation).
    max_new_tokens
        Overrides ``example.max_new_tokens``.
    prefix
        This example's :func:`prefill_shared_prefix`: a copy of its cache is used and only the rest
        of the prefill runs under the press (mixkv presses only: kvpress compresses only a prefill
        that starts at position 0).

    Returns
    -------
    dict
        JSON-serialisable record: output, score, token counts, timings (``prefill_seconds`` includes
        compression and the shared prefix's own time; ``decode_seconds`` covers the question and
        the generated tokens), KV bytes
        after prefill (``kv_bytes``) and what the full cache would hold (``kv_bytes_full``), mean
        kept tokens per KV head and the press's report.
    """
    from transformers import DynamicCache

    from mixkv.presses.base import BasePress

    # A press from another library (kvpress): no report, no prefix, and its cache reports kept entries.
    foreign = press is not None and not isinstance(press, BasePress)
    if prefix is not None and foreign:
        raise ValueError(
            f"{type(press).__name__} cannot continue from a shared prefix (only mixkv presses compress a "
            "cache that already holds one); pass prefix=None"
        )
    ids, n_prefill = _prompt_ids(example, tokenizer, protocol, model.device)
    start_at = 0 if prefix is None else prefix.tokens
    cache = DynamicCache(config=model.config) if prefix is None else copy.deepcopy(prefix.cache)
    new_tokens = max_new_tokens if max_new_tokens is not None else example.max_new_tokens
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else eos
    manager = press(model) if press is not None else contextlib.nullcontext()
    with torch.inference_mode(), manager:
        start = time.perf_counter()
        prefill(model, ids[:, start_at:n_prefill], cache)
        prefill_s = time.perf_counter() - start + (0.0 if prefix is None else prefix.seconds)
        kept_bytes = kv_cache_bytes(cache)
        if foreign:  # what its cache holds after prefill (mixkv presses report it)
            held = [
                keys
                for layer in cache.layers
                if isinstance(keys := getattr(layer, "keys", None), torch.Tensor)
            ]
            held_per_token = sum(2 * k.shape[1] * k.shape[3] * k.element_size() for k in held)
            held_tokens = sum(k.shape[2] for k in held) / max(len(held), 1)
        start = time.perf_counter()
        if not foreign:
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **{cache_argument(model): cache},
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            generated = out[0, ids.shape[1] :]
        else:
            generated = _greedy_with_positions(
                model, cache, ids, n_prefill, new_tokens, _eos_ids(model, tokenizer)
            )
        decode_s = time.perf_counter() - start
    text = tokenizer.decode(generated, skip_special_tokens=True)
    report = getattr(press, "last_report", None) if press is not None else None
    record: dict[str, Any] = {
        "question": example.question,
        "answers": list(example.answers),
        "metric": example.metric,
        "output": text,
        "score": score_output(text, example.answers, example.metric),
        "context_tokens": example.context_tokens,
        "prefill_tokens": int(n_prefill),
        "shared_prefix_tokens": start_at,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": int(generated.numel()),
        "context_sha1": hashlib.sha1(example.context.encode()).hexdigest(),
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "kv_bytes": kept_bytes,
        "kv_bytes_full": kept_bytes,
        "kept_tokens_mean": float(n_prefill),
        "compression_seconds": 0.0,
        "report": None,
    }
    if foreign:
        record["kv_bytes_full"] = int(n_prefill * held_per_token)
        record["kept_tokens_mean"] = held_tokens
    if report is not None:
        kept = report.kept_tokens
        record["kv_bytes_full"] = int(report.full_bytes)
        record["kept_tokens_mean"] = float(kept.float().mean().item()) if kept.numel() else 0.0
        record["compression_seconds"] = float(report.compression_seconds)
        to_dict = getattr(report, "to_dict", None)
        record["report"] = to_dict() if callable(to_dict) else None
    record["kv_fraction"] = record["kv_bytes"] / record["kv_bytes_full"] if record["kv_bytes_full"] else 1.0
    return record


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found = set(ids) if isinstance(ids, list) else ({ids} if ids is not None else set())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        found.add(int(tokenizer.eos_token_id))
    return found


def _greedy_with_positions(
    model: Any, cache: Any, ids: torch.Tensor, n_prefill: int, new_tokens: int, eos: set[int]
) -> torch.Tensor:
    """Greedy decoding one token per forward, with explicit positions.

    For presses whose cache reports the number of entries it *keeps* as its length (kvpress):
    ``generate`` would take that for the number of prompt tokens already seen and feed the prompt
    again from the wrong position. Here the rest of the prompt and every generated token are fed
    at their true positions; one token at a time, so no causal mask over a shortened cache is
    needed.
    """
    step_kwargs: dict[str, Any] = {cache_argument(model): cache, "use_cache": True}
    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters
    position, pending = n_prefill, ids[0, n_prefill:].tolist()
    out: list[int] = []
    while len(out) < new_tokens:
        for token in pending:
            where = torch.tensor([position], device=ids.device)
            if takes_cache_position:
                step_kwargs["cache_position"] = where
            logits = model(
                input_ids=where.new_tensor([[token]]), position_ids=where[None], **step_kwargs
            ).logits
            position += 1
        out.append(int(logits[0, -1].argmax()))
        if out[-1] in eos:
            break
        pending = out[-1:]
    return torch.tensor(out, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Cells and files


@dataclass(frozen=True)
class _Cell:
    method: str
    budget: int | None
    task: str
    context_length: int | None  # None: no context-length axis (multimodal tasks)

    @property
    def name(self) -> str:
        return cell_filename(self.method, self.budget, self.task, self.context_length)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "budget": self.budget,
            "task": self.task,
            "context_length": self.context_length,
        }


def cell_filename(method: str, budget: int | None, task: str, context_length: int | None) -> str:
    """File name of a cell's JSON result (no ``__L<length>`` part when ``context_length`` is None)."""
    b = "full" if budget is None else str(budget)
    length = "" if context_length is None else f"__L{context_length}"
    return f"{method}__b{b}__{task}{length}.json"


@dataclass
class EvalResult:
    """What :func:`run_eval` did.

    Attributes
    ----------
    cells
        Every finished cell's JSON content (computed now or read back).
    computed, reused
        Names of the cell files computed in this run and read back from disk.
    recomputed
        ``(file name, reason)`` of cell files that were corrupt or stale and were recomputed.
    skipped
        ``(cell name, reason)`` of cells not run (budget not below the context length).
    table_path
        The Markdown summary.
    plot_paths
        PNG plots (empty when matplotlib is not installed).
    """

    cells: list[dict[str, Any]] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    recomputed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    table_path: Path | None = None
    plot_paths: list[Path] = field(default_factory=list)


def _versions() -> dict[str, str]:
    import transformers

    try:
        mixkv_version = md.version("mixkv")
    except md.PackageNotFoundError:
        mixkv_version = str(getattr(importlib.import_module("mixkv"), "__version__", "unknown"))
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mixkv": mixkv_version,
    }


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def _model_id(model_spec: str | tuple[Any, Any] | None) -> str:
    if model_spec is None or isinstance(model_spec, str):
        return model_spec or "smollm2"
    model = model_spec[0]
    digest = hashlib.sha1(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:12]
    return f"{type(model).__name__}:{digest}"


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _validate_cell(data: Any, cell: _Cell, identity: dict[str, Any], n: int) -> str | None:
    """Return why a cell file cannot be reused, or None if it can."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("schema") != SCHEMA_VERSION:
        return f"schema {data.get('schema')!r} != {SCHEMA_VERSION}"
    if data.get("complete") is not True:
        return "cell not marked complete"
    if data.get("cell") != cell.as_dict():
        return "describes another cell"
    if data.get("identity") != identity:
        return "stale: produced with another model, seed, protocol or settings"
    examples = data.get("examples")
    if not isinstance(examples, list) or len(examples) != n:
        return f"holds {len(examples) if isinstance(examples, list) else 'no'} examples, expected {n}"
    if not all(isinstance(e, dict) and isinstance(e.get("score"), (int, float)) for e in examples):
        return "an example has no numeric score"
    return None


def _set_aside(path: Path, reason: str) -> Path:
    suffix = ".stale" if reason.startswith("stale") else ".corrupt"
    target = path.with_name(path.name + suffix)
    i = 1
    while target.exists():
        target = path.with_name(f"{path.name}{suffix}{i}")
        i += 1
    os.replace(path, target)
    return target


def _load_cell(
    path: Path, cell: _Cell, identity: dict[str, Any], n: int
) -> tuple[dict[str, Any] | None, str]:
    """Read a finished cell; returns ``(data, "")`` or ``(None, reason)``."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable JSON ({exc})"
    reason = _validate_cell(data, cell, identity, n)
    return (data, "") if reason is None else (None, reason)


def _partial_path(cell_dir: Path, cell: _Cell) -> Path:
    return cell_dir / f".{cell.name}.partial"


def _save_partial(
    cell_dir: Path, cell: _Cell, identity: dict[str, Any], records: list[dict[str, Any]], seconds: float
) -> None:
    """Checkpoint the examples a cell has finished, so a long run resumes mid-cell."""
    data = {"schema": SCHEMA_VERSION, "cell": cell.as_dict(), "identity": identity}
    _atomic_write_json(_partial_path(cell_dir, cell), {**data, "seconds": seconds, "examples": records})


def _load_partial(
    cell_dir: Path, cell: _Cell, identity: dict[str, Any], digests: Sequence[str]
) -> tuple[list[dict[str, Any]], float]:
    """The finished leading examples of a cell's checkpoint, or none.

    Records are kept only while they belong to this run (same schema, cell and identity) and each
    one's context is the one regenerated for its position (``context_sha1``); the rest is recomputed.
    """
    path = _partial_path(cell_dir, cell)
    if not path.exists():
        return [], 0.0
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if (data["schema"], data["cell"], data["identity"]) != (SCHEMA_VERSION, cell.as_dict(), identity):
            raise ValueError("checkpoint of another run")
        records = [r for r in data["examples"] if isinstance(r, dict)]
        seconds = float(data["seconds"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("Checkpoint %s not used (%s); the cell starts over.", path, exc)
        return [], 0.0
    kept = 0
    while kept < min(len(records), len(digests)) and records[kept].get("context_sha1") == digests[kept]:
        kept += 1
    if kept:
        logger.info("Resuming %s after %d finished example(s).", cell.name, kept)
    return records[:kept], seconds if kept == len(records) else 0.0


# --------------------------------------------------------------------------------------------
# Summary table and plots


def _cell_score(data: dict[str, Any]) -> float:
    return 100.0 * float(data["score"])


def _not_compressed(method: str, budget: int, length: int | None) -> bool:
    """Whether a compressed cell is skipped because its budget is not below the context length."""
    return method != "full" and length is not None and budget >= length


def write_markdown_table(
    cells: Sequence[dict[str, Any]],
    path: Path,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    tasks: Sequence[str],
    context_lengths: Sequence[int | None],
    compare: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the score table (rows: method; columns: budget x task) per context length.

    Scores are mean example scores in percent with their 95% bootstrap interval over examples
    (:mod:`mixkv.eval.stats_tables`); the ``avg`` column averages the tasks, each counting once. The
    full-cache row repeats its score under every budget. ``n/a`` marks a budget not below the
    context length, ``-`` a missing cell. A second table per context length gives the mean
    fraction of KV bytes kept and the prefill / decode times. A context length of None (multimodal grids) drops the per-length headings and the
    ``n/a`` rule. A last table compares, on the same examples, every MixKV method with its base
    (when both are in ``methods``) and every ``(A, B)`` pair of ``compare``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    index = {
        (c["cell"]["method"], c["cell"]["budget"], c["cell"]["task"], c["cell"]["context_length"]): c
        for c in cells
    }
    lines = ["# mixkv evaluation", ""]
    for length in context_lengths:
        where = "" if length is None else f"Context length {length} tokens: "
        shown = [c for c in cells if c["cell"]["context_length"] == length]
        lines += [f"## {where}score (%) [95% CI], {sample_sizes(shown, tasks)}", ""]
        header = ["method"] + [f"{b} {t}" for b in budgets for t in tasks]
        if len(tasks) > 1:
            header = ["method"] + [f"{b} {t}" for b in budgets for t in [*tasks, "avg"]]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for method in methods:
            row = [method]
            for b in budgets:
                found: list[dict[str, Any]] = []
                for t in tasks:
                    key = (method, None if method == "full" else b, t, length)
                    if _not_compressed(method, b, length):
                        row.append("n/a")
                    elif key in index:
                        found.append(index[key])
                        row.append(format_score(found[-1]))
                    else:
                        row.append("-")
                if len(tasks) > 1:
                    row.append(format_average(found) if len(found) == len(tasks) else "-")
            lines.append("| " + " | ".join(row) + " |")
        if any("†" in text for text in lines[-len(methods) :]):
            lines += ["", CORPUS_NOTE]
        lines += ["", f"## {where}KV kept (% of full), prefill s, decode s", ""]
        header = ["method"] + [f"budget {b}" for b in budgets]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for method in methods:
            row = [method]
            for b in budgets:
                found = [
                    index[k]
                    for t in tasks
                    if (k := (method, None if method == "full" else b, t, length)) in index
                ]
                if not found:
                    row.append("n/a" if _not_compressed(method, b, length) else "-")
                    continue
                ex = [e for c in found for e in c["examples"]]
                frac = 100 * sum(e["kv_fraction"] for e in ex) / len(ex)
                pre = sum(e["prefill_seconds"] for e in ex) / len(ex)
                dec = sum(e["decode_seconds"] for e in ex) / len(ex)
                row.append(f"{frac:.1f}% / {pre:.2f} / {dec:.2f}")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    pairs = list(dict.fromkeys([*mixkv_base_pairs(methods), *compare]))
    lines += paired_lines(index, pairs, budgets, tasks, context_lengths)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_plots(
    cells: Sequence[dict[str, Any]],
    out_dir: Path,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    tasks: Sequence[str],
    context_lengths: Sequence[int | None],
) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots written (`pip install matplotlib`).")
        return []
    index = {
        (c["cell"]["method"], c["cell"]["budget"], c["cell"]["task"], c["cell"]["context_length"]): c
        for c in cells
    }
    panels = [*tasks, "average"] if len(tasks) > 1 else list(tasks)
    paths: list[Path] = []
    top = 105.0
    for c in cells:
        top = max(top, _cell_score(c) + 5)  # e.g. CIDEr-D x 100 can exceed 100
    for length in context_lengths:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, panel in zip(axes[0], panels, strict=True):
            panel_tasks = tasks if panel == "average" else [panel]
            for method in methods:
                if method == "full":
                    full_vals = [
                        index[("full", None, t, length)]
                        for t in panel_tasks
                        if ("full", None, t, length) in index
                    ]
                    if len(full_vals) == len(panel_tasks):
                        score = sum(_cell_score(v) for v in full_vals) / len(full_vals)
                        ax.axhline(score, color="black", linestyle="--", label="full cache")
                    continue
                xs, ys = [], []
                for b in budgets:
                    vals = [
                        index[(method, b, t, length)] for t in panel_tasks if (method, b, t, length) in index
                    ]
                    if len(vals) == len(panel_tasks):
                        xs.append(b)
                        ys.append(sum(_cell_score(v) for v in vals) / len(vals))
                if xs:  # 20 colours: more than 10 methods stay distinguishable
                    ax.plot(
                        xs,
                        ys,
                        marker="o",
                        label=method,
                        color=plt.get_cmap("tab20")(methods.index(method) % 20),
                    )
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(budgets))
            ax.set_xticklabels([str(b) for b in budgets])
            ax.set_ylim(-5, top)
            ax.set_xlabel("budget (tokens per KV head)")
            ax.set_ylabel("score (%)")
            ax.set_title(panel if length is None else f"{panel} @ {length} tokens")
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path = out_dir / ("score_vs_budget.png" if length is None else f"score_vs_budget_L{length}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Shared by the text grid (:func:`run_eval`) and the multimodal one (mixkv.eval.mm_runner)


def _plan_cells(
    cells: Sequence[_Cell],
    cell_dir: Path,
    expected: Callable[[_Cell], tuple[dict[str, Any], int]],
    resume: bool,
    result: EvalResult,
) -> tuple[list[_Cell], dict[_Cell, dict[str, Any]]]:
    """Split cells into those to compute and finished ones read back from ``cell_dir``.

    ``expected(cell)`` gives the identity a reusable cell file must carry and its number of
    examples. A finished cell of the same run with fewer examples (an earlier, smaller ``n``)
    becomes the cell's checkpoint and is extended. Other unusable files are set aside and reported
    in ``result.recomputed``; reused ones are listed in ``result.reused``.
    """
    todo: list[_Cell] = []
    finished: dict[_Cell, dict[str, Any]] = {}
    for cell in cells:
        path = cell_dir / cell.name
        if not path.exists() or not resume:
            todo.append(cell)
            continue
        identity, n = expected(cell)
        data, reason = _load_cell(path, cell, identity, n)
        if data is None and _extendable(path, cell, identity, n):
            logger.info("Cell %s has fewer than %d examples; it is extended.", cell.name, n)
            todo.append(cell)
        elif data is None:
            moved = _set_aside(path, reason)
            logger.warning(
                "Cell file %s cannot be used (%s); kept as %s and recomputed.", path, reason, moved
            )
            result.recomputed.append((cell.name, reason))
            todo.append(cell)
        else:
            finished[cell] = data
            result.reused.append(cell.name)
    return todo, finished


def _extendable(path: Path, cell: _Cell, identity: dict[str, Any], n: int) -> bool:
    """Whether ``path`` is a finished cell of this run with fewer than ``n`` examples; if so, its
    examples become the cell's checkpoint (unless a longer checkpoint exists), so that a larger
    ``n`` computes only the new examples (examples depend on their index, not on ``n``)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not 0 < len(examples) < n:
        return False
    if _validate_cell(data, cell, identity, len(examples)) is not None:
        return False
    partial = _partial_path(path.parent, cell)
    try:
        with open(partial, encoding="utf-8") as fh:
            longer = len(json.load(fh)["examples"]) >= len(examples)
    except (OSError, ValueError, KeyError, TypeError):
        longer = False
    if not longer:
        _save_partial(path.parent, cell, identity, examples, float(data["timing"]["wall_seconds"]))
    return True


def _write_cell(
    cell_dir: Path,
    cell: _Cell,
    *,
    identity: dict[str, Any],
    config: dict[str, Any],
    records: Sequence[dict[str, Any]],
    score: float,
    wall_seconds: float,
    seed: int,
    versions: dict[str, str],
    machine: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one finished cell atomically and return its content.

    Every record needs ``score``, ``prefill_seconds``, ``decode_seconds``, ``kept_tokens_mean`` and
    ``kv_fraction``; ``extra`` adds top-level fields.
    """
    n = len(records)
    data: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "complete": True,
        "cell": cell.as_dict(),
        "identity": identity,
        "config": config,
        "score": score,
        "timing": {
            "wall_seconds": wall_seconds,
            "mean_prefill_seconds": sum(r["prefill_seconds"] for r in records) / n,
            "mean_decode_seconds": sum(r["decode_seconds"] for r in records) / n,
        },
        "kept_tokens_mean": sum(r["kept_tokens_mean"] for r in records) / n,
        "kv_fraction_mean": sum(r["kv_fraction"] for r in records) / n,
        **(extra or {}),
        "examples": list(records),
        "versions": versions,
        "machine": machine,
        "seed": seed,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _atomic_write_json(cell_dir / cell.name, data)
    return data


def _write_summary(
    result: EvalResult,
    cells: Sequence[_Cell],
    finished: dict[_Cell, dict[str, Any]],
    out: Path,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    tasks: Sequence[str],
    context_lengths: Sequence[int | None],
    compare: Sequence[tuple[str, str]] = (),
) -> None:
    """Fill ``result.cells`` and write ``results.md`` and the plots."""
    result.cells = [finished[c] for c in cells if c in finished]
    result.table_path = write_markdown_table(
        result.cells,
        out / "results.md",
        methods=methods,
        budgets=budgets,
        tasks=tasks,
        context_lengths=context_lengths,
        compare=compare,
    )
    result.plot_paths = _write_plots(
        result.cells, out, methods=methods, budgets=budgets, tasks=tasks, context_lengths=context_lengths
    )


# --------------------------------------------------------------------------------------------
# The grid


def _as_list(name: str, values: Sequence[Any] | Any) -> list[Any]:
    if isinstance(values, (str, int)):
        values = [values]
    out = list(values)
    if not out:
        raise ValueError(f"{name} must not be empty.")
    return out


def _check_methods(methods: Sequence[str] | str) -> list[str]:
    """Normalised method names; ValueError for unknown ones or kvpress methods without kvpress."""
    out = [m.strip().lower() for m in _as_list("methods", methods)]
    unknown = [m for m in out if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from: {', '.join(METHODS)}.")
    wanted_kvpress = [m for m in out if m in KVPRESS_METHODS]
    if wanted_kvpress and not kvpress_available():
        raise ValueError(
            f"Method(s) {wanted_kvpress} need NVIDIA's kvpress, which is not importable; "
            "`pip install kvpress` or drop them."
        )
    return out


def _check_compare(compare: Sequence[tuple[str, str]], methods: Sequence[str]) -> list[tuple[str, str]]:
    """Normalised ``(A, B)`` method pairs; ValueError unless both are distinct methods of the run."""
    out: list[tuple[str, str]] = []
    for pair in compare:
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(
                f"compare takes (A, B) method pairs, e.g. [('snapkv', 'keydiff')]; got {pair!r}."
            )
        a, b = (str(m).strip().lower() for m in pair)
        missing = [m for m in (a, b) if m not in methods]
        if missing:
            raise ValueError(
                f"compare pair {a}:{b} names {missing}, not among the methods run ({', '.join(methods)}); "
                "add them to the methods or drop the pair."
            )
        if a == b:
            raise ValueError(f"compare pair {a}:{b} compares a method with itself; name two methods.")
        out.append((a, b))
    return out


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError:

        class _Null:
            def update(self, k: int = 1) -> None:
                pass

            def set_description(self, text: str) -> None:
                pass

        yield _Null()
        return
    bar = tqdm(total=total, unit="example", file=sys.stderr, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def run_eval(
    model_spec: str | tuple[Any, Any] | None = None,
    methods: Sequence[str] = ("full", "snapkv", "mixkv-snapkv"),
    budgets: Sequence[int] = (64, 128),
    tasks: Sequence[str] = ("niah_single_1",),
    context_lengths: Sequence[int] = (1024,),
    n: int = 5,
    seed: int = 0,
    out_dir: str | Path = "mixkv_results",
    protocol: str = "query_agnostic",
    resume: bool = True,
    *,
    window_size: int = 32,
    max_new_tokens: int | None = None,
    share_prefill: bool = True,
    dtype: str = "float32",
    compare: Sequence[tuple[str, str]] = (),
) -> EvalResult:
    """Run (or resume) an evaluation grid and write per-cell JSON, a Markdown table and plots.

    Parameters
    ----------
    model_spec
        What :func:`mixkv.models.load_model` accepts (None = SmolLM2-135M-Instruct), or an already
        loaded ``(model, tokenizer)`` pair. The model is loaded only if some cell must be computed.
    methods
        Names from :data:`METHODS`. ``"full"`` runs once per (task, context length).
    budgets
        Positive budgets (average kept prompt tokens per KV head per layer, window included).
    tasks
        Names from :data:`mixkv.eval.tasks.TASKS`.
    context_lengths
        Context lengths in tokens.
    n
        Examples per cell (the same examples for every method and budget).
    seed
        Seed of the examples (and of ``torch`` before each cell, for the random press).
    out_dir
        Output directory: ``cells/*.json``, ``results.md``, ``score_vs_budget_L*.png``.
    protocol
        ``"query_agnostic"`` (compress the context before the question is known) or
        ``"query_aware"`` (compress the prompt with the question in the observation window).
    resume
        Reuse finished cell files (validated first). With False every cell is recomputed and
        overwritten.
    window_size
        Observation window of the presses.
    max_new_tokens
        Overrides each task's generation length.
    share_prefill
        Prefill each example's prompt, all but its last ``window_size`` tokens, once with the full
        cache and give every mixkv method a copy (see :func:`prefill_shared_prefix`); the press
        then compresses prefix and tail together, as in a one-go prefill. Up to float rounding of
        the chunked forward this is the same computation, many times cheaper on long prompts.
        False prefills every (method, budget) from scratch. kvpress methods always do.
    dtype
        ``"float32"`` or ``"bfloat16"``: parameter dtype of a model loaded by name or path (part of
        every cell's identity, so results of different dtypes never mix). For a model passed in,
        its own dtype is recorded.
    compare
        Method pairs ``(A, B)`` to compare on the same examples in ``results.md`` (B - A with a
        paired-bootstrap 95% CI, wins / ties / losses, exact sign test), besides every MixKV method
        against its base, which is always compared when both are run. Both must be in ``methods``.

    Returns
    -------
    EvalResult

    Raises
    ------
    ValueError
        Unknown method / task / protocol, kvpress methods without kvpress, a ``compare`` pair not
        made of two of ``methods``, non-positive budgets,
        lengths or ``n``, or a grid where every compressed cell has a budget not below its context
        length.
    """
    from mixkv.models import parse_dtype

    methods = _check_methods(methods)
    compare = _check_compare(compare, methods)
    torch_dtype = parse_dtype(dtype)
    if isinstance(model_spec, tuple):
        torch_dtype = next(model_spec[0].parameters()).dtype
    dtype_name = str(torch_dtype).removeprefix("torch.")
    budgets = sorted({int(b) for b in _as_list("budgets", budgets)})
    tasks = _as_list("tasks", tasks)
    context_lengths = [int(x) for x in _as_list("context_lengths", context_lengths)]
    bad_tasks = [t for t in tasks if t not in TASKS]
    if bad_tasks:
        raise ValueError(f"Unknown task(s) {bad_tasks}; choose from: {', '.join(TASKS)}.")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    if any(b < 1 for b in budgets):
        raise ValueError(f"Budgets must be positive token counts, got {budgets}.")
    if any(x < 16 for x in context_lengths):
        raise ValueError(f"Context lengths must be at least 16 tokens, got {context_lengths}.")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")

    result = EvalResult()
    cells: list[_Cell] = []
    for length in context_lengths:
        for task in tasks:
            for method in methods:
                if method == "full":
                    cells.append(_Cell(method, None, task, length))
                    continue
                for b in budgets:
                    if b >= length:
                        reason = f"budget {b} >= context length {length}: nothing would be compressed"
                        result.skipped.append((cell_filename(method, b, task, length), reason))
                        continue
                    cells.append(_Cell(method, b, task, length))
    if result.skipped:
        logger.warning(
            "Skipping %d cell(s) whose budget is not below the context length (%s).",
            len(result.skipped),
            ", ".join(sorted({r.split(":")[0] for _, r in result.skipped})),
        )
    if not any(c.method != "full" for c in cells) and any(m != "full" for m in methods):
        raise ValueError(
            f"Every budget {budgets} is >= every context length {context_lengths}: nothing would be "
            "compressed. Use smaller budgets or longer contexts."
        )

    out = Path(out_dir)
    cell_dir = out / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    run_config = {
        "model": _model_id(model_spec),
        "methods": methods,
        "budgets": budgets,
        "tasks": tasks,
        "context_lengths": context_lengths,
        "n": n,
        "seed": seed,
        "protocol": protocol,
        "window_size": window_size,
        "max_new_tokens": max_new_tokens,
        "share_prefill": share_prefill,
        "dtype": dtype_name,
    }
    identity = {  # n is not part of it: a finished cell with fewer examples is extended, not redone
        "model": run_config["model"],
        "dtype": dtype_name,
        "seed": seed,
        "protocol": protocol,
        "window_size": window_size,
        "max_new_tokens": max_new_tokens,
    }

    todo, finished = _plan_cells(cells, cell_dir, lambda cell: (identity, n), resume, result)

    if todo:
        if isinstance(model_spec, tuple):
            model, tokenizer = model_spec
        else:
            from mixkv.models import load_model

            model, tokenizer = load_model(model_spec, dtype=torch_dtype)
        versions, machine = _versions(), _machine()
        # Example-major order within each (task, context length): an example's shared prefix is
        # prefilled once and serves every pending cell; the cells are written when the group ends.
        groups: dict[tuple[str, int], list[_Cell]] = {}
        for cell in todo:
            assert cell.context_length is not None
            groups.setdefault((cell.task, cell.context_length), []).append(cell)
        with _progress(len(todo) * n) as bar:
            for (task, length), group in groups.items():
                bar.set_description(f"{task} L={length}")
                examples = make_examples(task, tokenizer, length, n, seed)
                digests = [hashlib.sha1(e.context.encode()).hexdigest() for e in examples]
                records: dict[_Cell, list[dict[str, Any]]] = {}
                seconds: dict[_Cell, float] = {}
                for cell in group:
                    records[cell], seconds[cell] = (
                        _load_partial(cell_dir, cell, identity, digests) if resume else ([], 0.0)
                    )
                    bar.update(len(records[cell]))
                for i, example in enumerate(examples):
                    pending = [cell for cell in group if len(records[cell]) == i]
                    if not pending:
                        continue
                    prefix = None
                    if share_prefill and any(c.method not in KVPRESS_METHODS for c in pending):
                        prefix = prefill_shared_prefix(
                            model, tokenizer, example, protocol=protocol, tail_tokens=window_size
                        )
                    _, prefill_tokens = _prompt_ids(example, tokenizer, protocol, model.device)
                    for cell in pending:
                        torch.manual_seed(seed)
                        press = build_press(
                            cell.method, cell.budget, context_tokens=prefill_tokens, window_size=window_size
                        )
                        start = time.perf_counter()
                        records[cell].append(
                            run_example(
                                model,
                                tokenizer,
                                example,
                                press,
                                protocol=protocol,
                                max_new_tokens=max_new_tokens,
                                prefix=None if cell.method in KVPRESS_METHODS else prefix,
                            )
                        )
                        seconds[cell] += time.perf_counter() - start
                        bar.update(1)
                    for cell in pending:  # an interrupted run resumes after the last finished example
                        _save_partial(cell_dir, cell, identity, records[cell], seconds[cell])
                for cell in group:
                    finished[cell] = _write_cell(
                        cell_dir,
                        cell,
                        identity=identity,
                        config=run_config,
                        records=records[cell],
                        score=sum(r["score"] for r in records[cell]) / n,
                        wall_seconds=seconds[cell],
                        seed=seed,
                        versions=versions,
                        machine=machine,
                    )
                    _partial_path(cell_dir, cell).unlink(missing_ok=True)
                    result.computed.append(cell.name)

    _write_summary(
        result,
        cells,
        finished,
        out,
        methods=methods,
        budgets=budgets,
        tasks=tasks,
        context_lengths=context_lengths,
        compare=compare,
    )
    return result
