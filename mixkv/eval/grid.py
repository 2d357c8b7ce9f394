"""The evaluation grid engine: cells planned, resumed, run example by example, stored and reported.

A grid runs methods x budgets x tasks x context lengths (:class:`GridSpec`); each *cell* (method,
budget, task, context length) runs the same examples of its task. What the examples are and how
one of them is run and scored is the part of a :class:`GridAdapter`: the text grid's
(:class:`mixkv.eval.runner.TextGrid`) and the multimodal one's
(:class:`mixkv.eval.mm_runner.MultimodalGrid`). Everything else is here, once:

* the cells: ``full`` and ``closed-book`` once per (task, context length), the presses at every
  budget, except budgets not below the context length (skipped with a message; a grid in which
  every compressed cell would be skipped is an error);
* each protocol's files in ``out_dir`` (several protocols: ``out_dir/<protocol>``, exactly as a
  run of that protocol alone writes them), its ``run.json`` identity and the records of a
  published run it continues (``resume_from``);
* finished cells read back, checkpoints resumed and written after every example, cell files
  (:mod:`mixkv.eval.cell_store`), or with ``report_only`` only what is finished so far;
* example-major order within each (task, context length): an example is prepared once (its shared
  prefix prefilled) for every pending cell of every protocol;
* data-parallel runs (``torchrun`` / ``accelerate launch``, :mod:`mixkv.eval.data_parallel`): rank 0
  plans the cells as above and sends the plan to the others; each rank computes the examples of
  its share (example ``i`` on rank ``i mod N``), checkpointing them in its own file; at the end rank
  0 gathers every rank's records and writes the cell files and reports exactly as one process
  does (records in example order). A crashed run resumes from all checkpoints, with any number of
  processes;
* ``results.md``, ``examples.csv`` and plots (:mod:`mixkv.eval.reporting`), and ``protocols.md``
  comparing the protocols of one run.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from mixkv.eval.cell_store import (
    Cell,
    EvalResult,
    Held,
    cell_filename,
    cells_so_far,
    load_partial,
    machine_info,
    plan_cells,
    remove_partials,
    resume_from_published,
    save_partial,
    software_versions,
    write_cell,
    write_run_identity,
)
from mixkv.eval.data_parallel import DataParallel, data_parallel
from mixkv.eval.methods import as_list
from mixkv.eval.reporting import write_summary
from mixkv.eval.stats_tables import UNBUDGETED_METHODS

__all__ = ["GridAdapter", "GridSpec", "check_budgets", "progress", "run_grid"]

logger = logging.getLogger("mixkv.eval")


@dataclass(frozen=True)
class GridSpec:
    """What a grid runs and where its files go (checked and normalised by the grid's entry point).

    Attributes
    ----------
    model
        What :func:`mixkv.model_loading.load_model` accepts (None: the default model), or a loaded
        ``(model, tokenizer or processor)`` pair; loaded only if some cell must be computed.
    methods
        Method names (:mod:`mixkv.eval.methods`), in the order of the report's rows.
    budgets
        Sorted positive budgets.
    tasks
        Task names, in the order of the report's columns.
    context_lengths
        Context lengths in tokens; ``(None,)`` for a grid without that axis (multimodal tasks).
    protocols
        The protocols run, each in its own directory when there are several.
    seed
        Seed of the examples and of ``torch`` before each cell's example; recorded in every cell.
    out_dir
        Where the files go.
    resume
        Reuse finished cells and checkpoints; False recomputes and overwrites them.
    report_only
        Compute nothing: report finished cells and the checkpoints of unfinished ones.
    resume_from
        A published run whose per-example records become this run's checkpoints.
    compare
        Method pairs compared on the same examples in ``results.md``.
    """

    model: str | tuple[Any, Any] | None
    methods: tuple[str, ...]
    budgets: tuple[int, ...]
    tasks: tuple[str, ...]
    context_lengths: tuple[int | None, ...]
    protocols: tuple[str, ...]
    seed: int
    out_dir: Path
    resume: bool = True
    report_only: bool = False
    resume_from: Path | None = None
    compare: tuple[tuple[str, str], ...] = ()


class GridAdapter(Protocol):
    """The part of a grid that depends on its kind of example (text or multimodal).

    The engine asks it what a cell's file must carry (:meth:`identity`, :meth:`examples_per_cell`,
    :meth:`cell_config`), how a cell scores (:meth:`score`, :meth:`finished_cell`) and, when some
    cell must be computed, to load the model (:meth:`load_model`), make a task's examples, prepare
    each example once (:meth:`prepare`) and run it in cells (:meth:`run_cells`).
    """

    def identity(self, protocol: str, cell: Cell) -> dict[str, Any]:
        """What a reusable cell file (or checkpoint) of ``cell`` under ``protocol`` must carry."""
        ...

    def examples_per_cell(self, cell: Cell) -> int:
        """How many examples a finished ``cell`` holds."""
        ...

    def run_identity(self, protocol: str) -> dict[str, Any] | None:
        """The identity every cell of ``protocol`` shares, written to ``run.json`` so the run's
        ``examples.csv`` can be resumed elsewhere; None when cells differ (``run.json`` then holds
        each cell's :meth:`identity`)."""
        ...

    def cell_config(self, protocol: str) -> dict[str, Any]:
        """The configuration recorded in every cell file (and ``run.json``) of ``protocol``."""
        ...

    def score(self, cell: Cell, records: list[dict[str, Any]]) -> float:
        """A cell's score on ``records`` (its first examples)."""
        ...

    def finished_cell(self, cell: Cell, records: list[dict[str, Any]]) -> tuple[float, dict[str, Any] | None]:
        """A finished cell's score and the extra top-level fields of its file."""
        ...

    def load_model(self) -> None:
        """Load (or take) the model; called once, before any example is made or run."""
        ...

    def examples(self, task: str, context_length: int | None) -> Sequence[Any]:
        """The examples of every cell of ``(task, context_length)``, in order."""
        ...

    def digest(self, example: Any) -> str:
        """What identifies an example in its records (a checkpoint is used only while it matches)."""
        ...

    def prepare(self, example: Any, pending: Sequence[tuple[str, Cell]]) -> Any:
        """What the ``(protocol, cell)`` pairs pending on ``example`` share (encoded inputs, a shared
        prefix...), computed once for all of them."""
        ...

    def run_cells(
        self, example: Any, prepared: Any, protocol: str, cells: Sequence[Cell]
    ) -> Iterator[tuple[Cell, dict[str, Any], float]]:
        """Run ``cells`` on ``example`` under ``protocol``: ``(cell, record, seconds)`` as each ends."""
        ...


def check_budgets(budgets: Sequence[int] | int) -> list[int]:
    """Sorted distinct budgets; ValueError when empty or not positive."""
    checked = sorted({int(b) for b in as_list("budgets", budgets)})
    if any(b < 1 for b in checked):
        raise ValueError(f"Budgets must be positive token counts, got {checked}.")
    return checked


@contextlib.contextmanager
def progress(total: int, shown: bool = True) -> Iterator[Any]:
    """A progress bar over ``total`` examples on stderr (tqdm's, or, without tqdm or when not
    ``shown``, one that shows nothing)."""
    try:
        if not shown:
            raise ImportError
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


def run_grid(spec: GridSpec, adapter: GridAdapter) -> EvalResult:
    """Run (or resume, or only report) the grid ``spec`` with ``adapter``; see the module
    documentation. With several protocols the result holds every protocol's cells (file names
    prefixed with the protocol) and ``table_path`` is ``protocols.md``. In a data-parallel run,
    only rank 0's result describes the grid (see :attr:`EvalResult.rank`).

    Raises
    ------
    ValueError
        Besides the adapter's refusals: the processes of a data-parallel run were given different
        grids (another ``--out``, other methods...); on every rank.
    """
    with data_parallel() as dp:
        return _run_grid(spec, adapter, dp)


def _run_grid(spec: GridSpec, adapter: GridAdapter, dp: DataParallel) -> EvalResult:
    cells, skipped = _plan(spec)
    dp.check_same_grid(_describe(spec, adapter, cells))
    protocols = spec.protocols
    # One protocol: the run's files in out_dir; several: each protocol's in out_dir/<protocol>,
    # exactly as a run of that protocol alone with that out_dir writes them (either resumes the other).
    outs = {p: spec.out_dir if len(protocols) == 1 else spec.out_dir / p for p in protocols}
    results = {p: EvalResult(skipped=list(skipped)) for p in protocols}
    finished: dict[str, dict[Cell, dict[str, Any]]] = {}
    if dp.world_size == 1:
        todo = _plan_files(spec, adapter, cells, outs, finished, results)
    else:  # rank 0 plans (reading, setting aside, seeding files); the others take its plan, or its refusal
        todo, refusal = [], None
        if dp.is_main:
            try:
                todo = _plan_files(spec, adapter, cells, outs, finished, results)
            except ValueError as exc:
                refusal = str(exc)
        todo, refusal = dp.broadcast((todo, refusal))
        if refusal is not None:
            raise ValueError(refusal)

    if todo:
        _compute(spec, adapter, todo, outs, finished, results, dp)
    if not dp.is_main:
        return EvalResult(skipped=list(skipped), rank=(dp.rank, dp.world_size))

    for p in protocols:
        write_summary(
            results[p],
            cells,
            finished[p],
            outs[p],
            methods=spec.methods,
            budgets=spec.budgets,
            tasks=spec.tasks,
            context_lengths=spec.context_lengths,
            compare=spec.compare,
        )
    rank = None if dp.world_size == 1 else (dp.rank, dp.world_size)
    if len(protocols) == 1:
        results[protocols[0]].rank = rank
        return results[protocols[0]]
    merged = _protocols_result(results, outs, spec.out_dir)
    merged.rank = rank
    return merged


def _describe(spec: GridSpec, adapter: GridAdapter, cells: Sequence[Cell]) -> dict[str, Any]:
    """What a process computes and where it writes, compared across the ranks of a data-parallel run."""
    return {
        "out_dir": str(spec.out_dir.resolve()),
        "cells": [cell.name for cell in cells],
        "protocols": list(spec.protocols),
        "seed": spec.seed,
        "resume": spec.resume,
        "report_only": spec.report_only,
        "resume_from": None if spec.resume_from is None else str(spec.resume_from.resolve()),
        "configs": [adapter.cell_config(p) for p in spec.protocols],
        "identities": [adapter.identity(p, cell) for p in spec.protocols for cell in cells],
    }


def _plan_files(
    spec: GridSpec,
    adapter: GridAdapter,
    cells: Sequence[Cell],
    outs: dict[str, Path],
    finished: dict[str, dict[Cell, dict[str, Any]]],
    results: dict[str, EvalResult],
) -> list[tuple[str, Cell]]:
    """Each protocol's directories, ``run.json`` and published checkpoints; its finished cells into
    ``finished`` (and ``results``); returns the ``(protocol, cell)`` pairs to compute."""
    sources = _published_sources(spec)
    todo: list[tuple[str, Cell]] = []
    for p in spec.protocols:
        cell_dir = outs[p] / "cells"
        cell_dir.mkdir(parents=True, exist_ok=True)

        def expected(cell: Cell, protocol: str = p) -> tuple[dict[str, Any], int]:
            return adapter.identity(protocol, cell), adapter.examples_per_cell(cell)

        identity = adapter.run_identity(p)
        write_run_identity(
            outs[p],
            adapter.cell_config(p),
            identity=identity,
            cell_identities=None if identity is not None else {c.name: adapter.identity(p, c) for c in cells},
        )
        if p in sources:
            seeded = resume_from_published(sources[p], cells, cell_dir, partial(adapter.identity, p))
            logger.info("%s: %d cell(s) resume from %s.", p, len(seeded), sources[p])
        if spec.report_only:
            finished[p] = cells_so_far(cells, cell_dir, expected, adapter.score)
        else:
            to_compute, finished[p] = plan_cells(cells, cell_dir, expected, spec.resume, results[p])
            if not spec.resume:  # recomputed from scratch: no checkpoint of an earlier run is left to resume
                for cell in to_compute:
                    remove_partials(cell_dir, cell)
            todo += [(p, cell) for cell in to_compute]
    return todo


def _plan(spec: GridSpec) -> tuple[list[Cell], list[tuple[str, str]]]:
    """The grid's cells in report order, and ``(cell name, reason)`` of those skipped."""
    skipped: list[tuple[str, str]] = []
    cells: list[Cell] = []
    for length in spec.context_lengths:
        for task in spec.tasks:
            for method in spec.methods:
                if method in UNBUDGETED_METHODS:
                    cells.append(Cell(method, None, task, length))
                    continue
                for b in spec.budgets:
                    if length is not None and b >= length:
                        reason = f"budget {b} >= context length {length}: nothing would be compressed"
                        skipped.append((cell_filename(method, b, task, length), reason))
                        continue
                    cells.append(Cell(method, b, task, length))
    if skipped:
        logger.warning(
            "Skipping %d cell(s) whose budget is not below the context length (%s).",
            len(skipped),
            ", ".join(sorted({r.split(":")[0] for _, r in skipped})),
        )
    if not any(c.method not in UNBUDGETED_METHODS for c in cells) and any(
        m not in UNBUDGETED_METHODS for m in spec.methods
    ):
        raise ValueError(
            f"Every budget {list(spec.budgets)} is >= every context length {list(spec.context_lengths)}: "
            "nothing would be compressed. Use smaller budgets or longer contexts."
        )
    return cells, skipped


def _published_sources(spec: GridSpec) -> dict[str, Path]:
    """Each protocol's published run to resume from (see :attr:`GridSpec.resume_from`)."""
    if spec.resume_from is None:
        return {}
    if spec.report_only or not spec.resume:
        raise ValueError("resume_from continues a run: it cannot go with report_only or without resume.")
    root, protocols = spec.resume_from, spec.protocols
    sources = {p: root if len(protocols) == 1 else root / p for p in protocols}
    sources = {p: path for p, path in sources.items() if (path / "examples.csv").is_file()}
    if not sources:
        where = str(root) if len(protocols) == 1 else " or ".join(str(root / p) for p in protocols)
        raise ValueError(f"Nothing to resume from: no examples.csv in {where}.")
    return sources


def _compute(
    spec: GridSpec,
    adapter: GridAdapter,
    todo: Sequence[tuple[str, Cell]],
    outs: dict[str, Path],
    finished: dict[str, dict[Cell, dict[str, Any]]],
    results: dict[str, EvalResult],
    dp: DataParallel,
) -> None:
    """Compute this rank's share of the ``(protocol, cell)`` pairs of ``todo`` and write the
    finished cells (rank 0; into ``finished`` and ``results``): one process writes each (task,
    context length)'s cells as soon as they are done; a data-parallel run gathers every rank's
    records at the end, and a rank's failure is raised on every rank."""
    groups: dict[tuple[str, int | None], list[tuple[str, Cell]]] = {}
    for p, cell in todo:
        groups.setdefault((cell.task, cell.context_length), []).append((p, cell))
    versions, machine = software_versions(), machine_info()

    def write_group(group: Sequence[tuple[str, Cell]], held: dict[tuple[str, Cell], Held]) -> None:
        for p, cell in group:
            n = adapter.examples_per_cell(cell)
            missing = [i for i in range(n) if i not in held[p, cell]]
            if missing:
                raise RuntimeError(f"{cell.name}: examples {missing} were computed by no rank.")
            records = [held[p, cell][i][0] for i in range(n)]
            score, extra = adapter.finished_cell(cell, records)
            finished[p][cell] = write_cell(
                outs[p] / "cells",
                cell,
                identity=adapter.identity(p, cell),
                config=adapter.cell_config(p),
                records=records,
                score=score,
                wall_seconds=sum(held[p, cell][i][1] for i in range(n)),
                seed=spec.seed,
                versions=versions,
                machine=machine,
                extra=extra,
            )
            remove_partials(outs[p] / "cells", cell)
            results[p].computed.append(cell.name)

    if dp.world_size == 1:
        _compute_share(spec, adapter, groups, outs, dp, write_group)
        return
    held: dict[tuple[str, Cell], Held] = {}
    failure = None
    try:
        held = _compute_share(spec, adapter, groups, outs, dp, None)
    except Exception as exc:  # the others wait for this rank's records: tell them, then raise
        failure = f"rank {dp.rank}: {type(exc).__name__}: {exc}"
        raise
    finally:
        gathered = dp.gather((held, failure))
        failures = [f for _, f in gathered or [] if f is not None]
        failures = dp.broadcast(failures)
    if failures:
        raise RuntimeError(
            "A rank of the data-parallel grid failed (its finished examples are checkpointed; rerun "
            "to resume): " + "; ".join(failures)
        )
    if gathered is not None:  # rank 0: every rank's records, the first rank holding an example wins
        union: dict[tuple[str, Cell], Held] = {key: {} for key in todo}
        for rank_held, _ in gathered:
            for key, entries in rank_held.items():
                for index, entry in entries.items():
                    union[key].setdefault(index, entry)
        for group in groups.values():
            write_group(group, union)


def _compute_share(
    spec: GridSpec,
    adapter: GridAdapter,
    groups: dict[tuple[str, int | None], list[tuple[str, Cell]]],
    outs: dict[str, Path],
    dp: DataParallel,
    write_group: Callable[[Sequence[tuple[str, Cell]], dict[tuple[str, Cell], Held]], None] | None,
) -> dict[tuple[str, Cell], Held]:
    """Compute this rank's examples of ``groups``, example-major within each (task, context
    length), checkpointing every example (a rank: the examples of its share, in its own file);
    ``write_group(group, held)`` after each group when given. Returns what every cell holds, by
    example index: its checkpoints read at the start of the group and what this rank computed."""
    adapter.load_model()
    held: dict[tuple[str, Cell], Held] = {}
    checkpoint_rank = None if dp.world_size == 1 else dp.rank
    total = sum(
        len(dp.share(adapter.examples_per_cell(cell))) for group in groups.values() for _, cell in group
    )
    with progress(total, shown=dp.is_main) as bar:
        for (task, length), group in groups.items():
            label = task if length is None else f"{task} L={length}"
            bar.set_description(label if dp.world_size == 1 else f"{label} (rank 0 of {dp.world_size})")
            examples = adapter.examples(task, length)
            digests = [adapter.digest(example) for example in examples]
            share = dp.share(len(examples))  # one process: every example
            for p, cell in group:
                identity = adapter.identity(p, cell)
                held[p, cell] = (
                    load_partial(outs[p] / "cells", cell, identity, digests) if spec.resume else {}
                )
                bar.update(sum(1 for i in held[p, cell] if i in share))
            for i in share:
                example = examples[i]
                pending = [key for key in group if i not in held[key]]
                if not pending:
                    continue
                prepared = adapter.prepare(example, pending)
                for p in spec.protocols:
                    cells_now = [cell for q, cell in pending if q == p]
                    if not cells_now:
                        continue
                    for cell, record, spent in adapter.run_cells(example, prepared, p, cells_now):
                        held[p, cell][i] = (record, spent)
                        bar.update(1)
                    for cell in cells_now:  # an interrupted run resumes with the examples checkpointed
                        mine = {j: entry for j, entry in held[p, cell].items() if j in share}
                        save_partial(
                            outs[p] / "cells", cell, adapter.identity(p, cell), mine, checkpoint_rank
                        )
            if write_group is not None:
                write_group(group, held)
    return held


def _protocols_result(results: dict[str, EvalResult], outs: dict[str, Path], out: Path) -> EvalResult:
    """One result for a run of several protocols: every protocol's cells and files (names
    prefixed with the protocol), and ``protocols.md``, which compares each later protocol with
    the first on the same examples (:func:`~mixkv.eval.compare_runs.compare_runs`)."""
    from mixkv.eval.compare_runs import compare_runs

    merged = EvalResult()
    for p, result in results.items():
        merged.cells += result.cells
        merged.computed += [f"{p}/{name}" for name in result.computed]
        merged.reused += [f"{p}/{name}" for name in result.reused]
        merged.recomputed += [(f"{p}/{name}", reason) for name, reason in result.recomputed]
        merged.skipped += [(f"{p}/{name}", reason) for name, reason in result.skipped]
        merged.plot_paths += result.plot_paths
    first, *others = results
    lines = [f"Each protocol's own tables: {', '.join(f'[{p}]({p}/results.md)' for p in results)}.", ""]
    for p in others:
        try:
            # Named as folders next to protocols.md, not by the machine path they were run in.
            lines += compare_runs(outs[first], outs[p], labels=(first, p))
        except ValueError as exc:  # nothing in common yet
            lines += [f"{p} against {first}: {exc}", ""]
    merged.table_path = out / "protocols.md"
    merged.table_path.write_text("\n".join(lines), encoding="utf-8")
    return merged
