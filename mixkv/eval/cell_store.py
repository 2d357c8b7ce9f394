"""Where evaluation results are stored: one JSON file per finished cell, checkpoints, resume.

A finished cell (method, budget, task, context length) is written as one JSON file, atomically, in
``out_dir/cells``; on resume finished cells are read back instead of recomputed. Within a cell
every finished example is checkpointed with its index (``cells/.<name>.partial``; each rank of a
data-parallel run writes its own, ``cells/.<name>.rank<r>.partial``), so an interrupted run
computes only the examples no checkpoint holds, whichever number of processes wrote them; a
checkpoint is used only for the same run (identity), and a record only where its example is the
one regenerated for its index. A cell
file that cannot be read or does not match the run (corrupt, truncated, other seed, other
model...) is reported, kept aside as ``<name>.json.corrupt`` (or ``.stale``) and recomputed; it is
never used silently. Used by the grid engine (:mod:`mixkv.eval.grid`) for the text and the
multimodal grid.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import importlib
import importlib.metadata as md
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SCHEMA_VERSION",
    "Cell",
    "EvalResult",
    "Held",
    "cell_filename",
    "load_partial",
    "machine_info",
    "model_identity",
    "partial_path",
    "plan_cells",
    "remove_partials",
    "resume_from_published",
    "save_partial",
    "software_versions",
    "write_cell",
    "write_run_identity",
]

logger = logging.getLogger("mixkv.eval")

#: Bump when the content of generated examples or cell files changes incompatibly.
SCHEMA_VERSION = 1

#: Beside a run's ``examples.csv``: what every one of its records was computed with.
RUN_IDENTITY_FILE = "run.json"

#: ``examples.csv`` columns a record is rebuilt from on resume, with their types (see
#: :func:`resume_from_published`); the cell, example index and the rest are not record fields.
_RECORD_COLUMNS: dict[str, Callable[[str], Any]] = {
    "example_sha1": str,
    "context_sha1": str,
    "score": float,
    "kv_fraction": float,
    "kept_tokens_mean": float,
    "new_tokens": int,
    "prefill_seconds": float,
    "decode_seconds": float,
    "image_tokens_total": int,
    "image_tokens_kept": float,
    "video_tokens_total": int,
    "video_tokens_kept": float,
    "output": str,
}


#: A cell's examples held so far: example index -> (its record, the seconds spent computing it).
Held = dict[int, tuple[dict[str, Any], float]]


@dataclass(frozen=True)
class Cell:
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
    """What :func:`mixkv.eval.runner.run_eval` (or ``run_mm_eval``) did.

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
    rank
        ``(rank, world size)`` of a process of a data-parallel run, None for one process. A rank
        other than 0 computes its share of the examples and writes no cell file or report (rank 0
        does): its result holds no cells.
    """

    cells: list[dict[str, Any]] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    recomputed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    table_path: Path | None = None
    plot_paths: list[Path] = field(default_factory=list)
    rank: tuple[int, int] | None = None


def software_versions() -> dict[str, str]:
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


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def model_identity(model_spec: str | tuple[Any, Any] | None) -> str:
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


def _validate_cell(data: Any, cell: Cell, identity: dict[str, Any], n: int) -> str | None:
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


def _load_cell(path: Path, cell: Cell, identity: dict[str, Any], n: int) -> tuple[dict[str, Any] | None, str]:
    """Read a finished cell; returns ``(data, "")`` or ``(None, reason)``."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable JSON ({exc})"
    reason = _validate_cell(data, cell, identity, n)
    return (data, "") if reason is None else (None, reason)


def partial_path(cell_dir: Path, cell: Cell, rank: int | None = None) -> Path:
    """The checkpoint of ``cell`` written by a one-process run (``rank`` None) or by one rank of a
    data-parallel run."""
    return cell_dir / f".{cell.name}{'' if rank is None else f'.rank{rank}'}.partial"


def _partial_paths(cell_dir: Path, cell: Cell) -> list[Path]:
    """Every checkpoint of ``cell`` present: the one-process one first, then the ranks' in rank order."""
    ranks = sorted(
        int(match.group(1))
        for path in cell_dir.glob(f".{glob.escape(cell.name)}.rank*.partial")
        if (match := re.fullmatch(rf"\.{re.escape(cell.name)}\.rank(\d+)\.partial", path.name))
    )
    single = partial_path(cell_dir, cell)
    return ([single] if single.exists() else []) + [partial_path(cell_dir, cell, r) for r in ranks]


def save_partial(
    cell_dir: Path, cell: Cell, identity: dict[str, Any], held: Held, rank: int | None = None
) -> None:
    """Checkpoint the examples of a cell held so far (by index), so a long run resumes mid-cell;
    ``rank``: that rank's own file (see :func:`partial_path`)."""
    indices = sorted(held)
    data = {"schema": SCHEMA_VERSION, "cell": cell.as_dict(), "identity": identity}
    _atomic_write_json(
        partial_path(cell_dir, cell, rank),
        {
            **data,
            "seconds": sum(held[i][1] for i in indices),
            "indices": indices,
            "example_seconds": [held[i][1] for i in indices],
            "examples": [held[i][0] for i in indices],
        },
    )


def _read_partial(path: Path, cell: Cell, identity: dict[str, Any]) -> Held:
    """One checkpoint's examples; ValueError (or OSError, KeyError, TypeError) when it cannot be used.
    A checkpoint without ``indices`` (written before they were recorded) holds examples 0, 1, ...
    and only its total seconds, shared evenly."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if (data["schema"], data["cell"], data["identity"]) != (SCHEMA_VERSION, cell.as_dict(), identity):
        raise ValueError("checkpoint of another run")
    records = data["examples"]
    indices = data.get("indices", list(range(len(records))))
    seconds = data.get("example_seconds", [float(data["seconds"]) / max(len(records), 1)] * len(records))
    if not len(indices) == len(seconds) == len(records):
        raise ValueError("indices, seconds and examples differ in length")
    return {
        int(i): (r, float(s))
        for i, r, s in zip(indices, records, seconds, strict=True)
        if isinstance(r, dict)
    }


def _checkpointed(cell_dir: Path, cell: Cell, identity: dict[str, Any]) -> Held:
    """Every example of ``cell`` its checkpoints hold for this run (see :func:`load_partial`)."""
    held: Held = {}
    for path in _partial_paths(cell_dir, cell):
        try:
            found = _read_partial(path, cell, identity)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("Checkpoint %s not used (%s).", path, exc)
            continue
        for index, entry in found.items():
            held.setdefault(index, entry)
    return held


def _leading(held: Held) -> int:
    """How many examples 0, 1, ... ``held`` holds without a gap."""
    count = 0
    while count in held:
        count += 1
    return count


def load_partial(cell_dir: Path, cell: Cell, identity: dict[str, Any], digests: Sequence[str] | None) -> Held:
    """The finished examples of a cell's checkpoints, by index, whichever process wrote them.

    Every checkpoint of the cell is read (a one-process run's and each rank's; where two hold an
    index, the first in that order). Records are kept only while they belong to this run (same
    schema, cell and identity) and only where the example (context, question, answers:
    ``example_sha1``) is the one regenerated for its index (not checked when ``digests`` is None);
    the rest is recomputed.
    """
    held = _checkpointed(cell_dir, cell, identity)
    if digests is not None:
        held = {
            i: entry
            for i, entry in held.items()
            if i < len(digests) and entry[0].get("example_sha1") == digests[i]
        }
    if held:
        logger.info("Resuming %s with %d finished example(s).", cell.name, len(held))
    return held


def remove_partials(cell_dir: Path, cell: Cell) -> None:
    """Remove every checkpoint of ``cell`` (once its file is written, or when it is recomputed)."""
    for path in _partial_paths(cell_dir, cell):
        path.unlink(missing_ok=True)


def cells_so_far(
    cells: Sequence[Cell],
    cell_dir: Path,
    expected: Callable[[Cell], tuple[dict[str, Any], int]],
    score: Callable[[Cell, list[dict[str, Any]]], float],
) -> dict[Cell, dict[str, Any]]:
    """Finished cells, and unfinished ones as far as their checkpoints go: a run in progress, read
    without changing any file.

    ``expected`` is as for :func:`plan_cells`; ``score(cell, records)`` is a cell's score on its
    records. The checkpointed cells of one (task, context length) are cut to the examples every
    one of them has finished, so that they are compared on the same examples; cells with neither
    a valid file nor a checkpoint are left out. Checkpointed cells carry ``"complete": False``.
    """
    out: dict[Cell, dict[str, Any]] = {}
    held: dict[Cell, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for cell in cells:
        identity, n = expected(cell)
        path = cell_dir / cell.name
        data = _load_cell(path, cell, identity, n)[0] if path.exists() else None
        if data is not None:
            out[cell] = data
            continue
        checkpointed = _checkpointed(cell_dir, cell, identity)
        records = [checkpointed[i][0] for i in range(_leading(checkpointed))]
        fewer = _fewer_examples(path, cell, identity, n)  # a finished cell of a smaller n
        if fewer is not None and len(fewer["examples"]) > len(records):
            records = fewer["examples"]
        if records:
            held[cell] = identity, records[:n]
    common: dict[tuple[str, int | None], int] = {}
    for cell, (_, records) in held.items():
        key = (cell.task, cell.context_length)
        common[key] = min(common.get(key, len(records)), len(records))
    for cell, (identity, records) in held.items():
        kept = records[: common[(cell.task, cell.context_length)]]
        out[cell] = {
            "schema": SCHEMA_VERSION,
            "complete": False,
            "cell": cell.as_dict(),
            "identity": identity,
            "score": score(cell, kept),
            "examples": kept,
        }
    return out


def plan_cells(
    cells: Sequence[Cell],
    cell_dir: Path,
    expected: Callable[[Cell], tuple[dict[str, Any], int]],
    resume: bool,
    result: EvalResult,
) -> tuple[list[Cell], dict[Cell, dict[str, Any]]]:
    """Split cells into those to compute and finished ones read back from ``cell_dir``.

    ``expected(cell)`` gives the identity a reusable cell file must carry and its number of
    examples. A finished cell of the same run with fewer examples (an earlier, smaller ``n``)
    becomes the cell's checkpoint and is extended. Other unusable files are set aside and reported
    in ``result.recomputed``; reused ones are listed in ``result.reused``.
    """
    todo: list[Cell] = []
    finished: dict[Cell, dict[str, Any]] = {}
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


def _fewer_examples(path: Path, cell: Cell, identity: dict[str, Any], n: int) -> dict[str, Any] | None:
    """The content of ``path`` if it is a finished cell of this run with fewer than ``n`` examples."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not 0 < len(examples) < n:
        return None
    if _validate_cell(data, cell, identity, len(examples)) is not None:
        return None
    return data


def _extendable(path: Path, cell: Cell, identity: dict[str, Any], n: int) -> bool:
    """Whether ``path`` is a finished cell of this run with fewer than ``n`` examples; if so, its
    examples become the cell's checkpoint (unless a longer checkpoint exists), so that a larger
    ``n`` computes only the new examples (examples depend on their index, not on ``n``)."""
    data = _fewer_examples(path, cell, identity, n)
    if data is None:
        return False
    examples = data["examples"]
    held = _checkpointed(path.parent, cell, identity)
    if _leading(held) < len(examples):
        each = float(data["timing"]["wall_seconds"]) / len(examples)
        save_partial(path.parent, cell, identity, held | {i: (r, each) for i, r in enumerate(examples)})
    return True


def write_cell(
    cell_dir: Path,
    cell: Cell,
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


def write_run_identity(
    out_dir: Path,
    config: dict[str, Any],
    *,
    identity: dict[str, Any] | None = None,
    cell_identities: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write ``out_dir/run.json``: what the run's records were computed with and its configuration,
    so that its published ``examples.csv`` can be resumed elsewhere (:func:`resume_from_published`).

    ``identity`` is the one every cell shares (model, dtype, seed, protocol, window, answer length:
    the text grid); where cells differ (a multimodal grid's identity holds its task's examples),
    ``cell_identities`` maps each cell's file name to its own.
    """
    if (identity is None) == (cell_identities is None):
        raise ValueError("Give run.json either the identity every cell shares or each cell's identity.")
    described: dict[str, Any] = {"schema": SCHEMA_VERSION}
    if identity is not None:
        described["identity"] = identity
    else:
        described["cell_identities"] = cell_identities
    path = out_dir / RUN_IDENTITY_FILE
    _atomic_write_json(path, {**described, "config": config})
    return path


def _differences(theirs: dict[str, Any] | None, ours: dict[str, Any]) -> str:
    """``"k=theirs, this run has k=ours"`` for the settings on which two identities differ."""
    theirs = theirs or {}
    differ = sorted(k for k in {**ours, **theirs} if theirs.get(k) != ours.get(k))
    return (
        ", ".join(f"{k}={theirs.get(k)!r}" for k in differ)
        + ", this run has "
        + ", ".join(f"{k}={ours.get(k)!r}" for k in differ)
    )


def resume_from_published(
    source: Path,
    cells: Sequence[Cell],
    cell_dir: Path,
    identity_of: Callable[[Cell], dict[str, Any]],
) -> list[str]:
    """Make a published run's per-example records (``source/examples.csv`` with its ``run.json``)
    the checkpoints of ``cells`` where they go further than what ``cell_dir`` holds.

    ``identity_of(cell)`` is the identity this run gives ``cell``; the published cell must have been
    computed with the same one (``run.json``'s shared ``identity``, or the cell's entry of its
    ``cell_identities``). Records are rebuilt from the CSV's columns (score, KV fraction, kept
    tokens, image and video tokens, answer length, timings, digests and, where present, the output);
    nothing else of the original record (the press's report, a multimodal example's prompt) is
    restored. As for any checkpoint, the run then keeps a record only while its ``example_sha1`` is
    that of the example regenerated for its position (:func:`load_partial`), so a record is never
    attached to another example. Returns the names of the cells given a checkpoint.

    Raises
    ------
    ValueError
        ``source`` lacks ``examples.csv`` or ``run.json``, a published cell's identity is not this
        run's (say which settings differ), or its rows of a cell are not examples 0, 1, ... in order.
    """
    table, described = source / "examples.csv", source / RUN_IDENTITY_FILE
    missing = [str(p) for p in (table, described) if not p.is_file()]
    if missing:
        raise ValueError(
            f"Cannot resume from {source}: {', '.join(missing)} missing. Give the directory a "
            "`mixkv eval` run (or `--report-only`) wrote its examples.csv and run.json to."
        )
    published_run = json.loads(described.read_text(encoding="utf-8"))
    shared, per_cell = published_run.get("identity"), published_run.get("cell_identities") or {}
    if shared is not None and cells and shared != identity_of(cells[0]):
        raise ValueError(
            f"Cannot resume from {source}: it was run with {_differences(shared, identity_of(cells[0]))}. "
            "Change those settings (or resume from a run that matches)."
        )
    rows: dict[tuple[str, str, str, str], list[dict[str, str]]] = {}
    with table.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            rows.setdefault((row["method"], row["budget"], row["task"], row["context_length"]), []).append(
                row
            )
    seeded = []
    for cell in cells:
        key = (
            cell.method,
            "" if cell.budget is None else str(cell.budget),
            cell.task,
            "" if cell.context_length is None else str(cell.context_length),
        )
        published = rows.get(key, [])
        if not published:
            continue
        if [int(r["example"]) for r in published] != list(range(len(published))):
            raise ValueError(f"{table}: the rows of {cell.name} are not examples 0, 1, ... in order.")
        identity = identity_of(cell)
        theirs = shared if shared is not None else per_cell.get(cell.name)
        if theirs != identity:
            raise ValueError(
                f"Cannot resume from {source}: its {cell.name} was run with {_differences(theirs, identity)}. "
                "Change those settings (or resume from a run that matches)."
            )
        held = _checkpointed(cell_dir, cell, identity)
        if len(published) <= max(_leading(held), _finished_examples(cell_dir, cell, identity)):
            continue
        # An empty field is a missing value, except an output (an empty answer is one).
        records = [
            {
                c: convert(r[c])
                for c, convert in _RECORD_COLUMNS.items()
                if r.get(c) or (c == "output" and c in r)
            }
            | {"resumed_from": str(source)}
            for r in published
        ]
        seconds = [r["prefill_seconds"] + r["decode_seconds"] for r in records]
        save_partial(cell_dir, cell, identity, held | dict(enumerate(zip(records, seconds, strict=True))))
        seeded.append(cell.name)
    return seeded


def _finished_examples(cell_dir: Path, cell: Cell, identity: dict[str, Any]) -> int:
    """How many examples of this run the finished file of ``cell`` holds (0 without one)."""
    try:
        with open(cell_dir / cell.name, encoding="utf-8") as fh:
            data = json.load(fh)
        return len(data["examples"]) if data["identity"] == identity else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0
