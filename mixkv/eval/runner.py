"""What the text evaluation grid runs: methods x budgets x tasks x context lengths.

Each *cell* (method, budget, task, context length) runs ``n`` seeded examples of a task from
:mod:`mixkv.eval.tasks`. For every example the prompt is prefilled once with the press active
(that is when the cache is compressed) and the answer is decoded greedily from the compressed
cache (:mod:`mixkv.eval.example`). Cells are stored and resumed by :mod:`mixkv.eval.cell_store`
and reported by :mod:`mixkv.eval.reporting`.

Budgets at least as large as a cell's context length are skipped with a message (the press
would keep everything, so the cell would only repeat the full-cache result); the summary table
shows them as ``n/a``. A grid in which every compressed cell would be skipped is an error.

Besides the presses, the grid has two methods without a budget, run once per (task, context
length): ``full`` (the full cache) and ``closed-book`` (the question without its context: what
the model answers from memory or guesses, the floor a press must beat to have read anything).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixkv.eval.cell_store import (
    Cell,
    EvalResult,
    cell_filename,
    cells_so_far,
    load_partial,
    machine_info,
    model_identity,
    partial_path,
    plan_cells,
    resume_from_published,
    save_partial,
    software_versions,
    write_cell,
    write_run_identity,
)
from mixkv.eval.example import (
    PROTOCOLS,
    SharedPrefix,
    prefill_shared_prefix,
    prompt_ids,
    run_closed_book,
    run_example,
    run_examples_together,
)
from mixkv.eval.replay import prefill_with_inputs
from mixkv.eval.reporting import write_summary
from mixkv.eval.stats_tables import UNBUDGETED_METHODS
from mixkv.eval.tasks import TASKS, make_examples
from mixkv.integration.decoder_layout import describe_decoder
from mixkv.presses.decoding import DecodingPress
from mixkv.presses.registry import KVPRESS_MASKING_NAMES, KVPRESS_NAMES, NAMES, build_press, kvpress_available

# build_press, cell_filename, kvpress_available, prefill_shared_prefix and run_example stay
# importable from here: the tests (and earlier code) import them from this module.
__all__ = [
    "CLOSED_BOOK",
    "KVPRESS_METHODS",
    "METHODS",
    "EvalResult",
    "MethodVariant",
    "as_list",
    "build_press",
    "cell_filename",
    "check_compare",
    "check_methods",
    "kvpress_available",
    "parse_method",
    "prefill_shared_prefix",
    "progress",
    "run_eval",
    "run_example",
]

logger = logging.getLogger("mixkv.eval")

#: Methods backed by NVIDIA's ``kvpress`` package (only when it is importable).
KVPRESS_METHODS: tuple[str, ...] = KVPRESS_NAMES

#: The text grid's method that asks each question without its context (no press, nothing to compress).
CLOSED_BOOK = "closed-book"

#: Every method name :func:`run_eval` accepts: the press registry's names and :data:`CLOSED_BOOK`.
METHODS: tuple[str, ...] = (*NAMES, CLOSED_BOOK)


def as_list(name: str, values: Sequence[Any] | Any) -> list[Any]:
    if isinstance(values, (str, int)):
        values = [values]
    out = list(values)
    if not out:
        raise ValueError(f"{name} must not be empty.")
    return out


@dataclass(frozen=True)
class MethodVariant:
    """A grid method name split into its press and how the press runs.

    A text grid's method is a registry name, optionally followed by ``+chunkN`` (the prompt is
    prefilled in chunks of ``N`` tokens and compressed as it goes, see
    :meth:`~mixkv.integration.session.PressSession.chunked_prefill`) and/or ``+decodeN`` (the
    press is wrapped in :class:`~mixkv.DecodingPress` with ``interval=N``, so the cache is cut
    back to the budget every ``N`` tokens fed after the prompt), e.g.
    ``"mixkv-snapkv+chunk512+decode16"``. Such variants run on the same examples as their
    plain method, so ``compare=[("mixkv-snapkv", "mixkv-snapkv+chunk512")]`` measures what the
    mode costs, paired. A chunked variant prefills every example from position 0 (it shares no
    prefix).
    """

    press_method: str
    prefill_chunk_size: int | None = None
    decoding_interval: int | None = None

    def press(self, budget: int | None, *, context_tokens: int, window_size: int = 32) -> Any:
        """:func:`~mixkv.presses.registry.build_press` of ``press_method``, inside a
        :class:`~mixkv.DecodingPress` when the variant has a decoding interval."""
        if self.press_method == CLOSED_BOOK:
            return None
        press = build_press(self.press_method, budget, context_tokens=context_tokens, window_size=window_size)
        if self.decoding_interval is None:
            return press
        return DecodingPress(press, interval=self.decoding_interval)

    @property
    def continues_a_prefix(self) -> bool:
        """Whether the method prefills only the tail of an example, under its press, from a copy of
        the shared full-cache prefix (kvpress presses replay instead, see
        :attr:`replays_a_prefill`; chunked prefills start from position 0)."""
        return self.press_method not in (CLOSED_BOOK, *KVPRESS_METHODS) and self.prefill_chunk_size is None

    @property
    def decodes_together(self) -> bool:
        """Whether the method's answers can be decoded in one batch with other such methods'
        (:func:`~mixkv.eval.example.run_examples_together`, in the session of a mixkv press among
        them): the full cache, mixkv presses that do not compress while decoding, and kvpress
        presses that leave a plain shortened cache (not those that mask keys while decoding, nor
        ``closed-book``, whose prompt is another)."""
        return (
            self.press_method not in (CLOSED_BOOK, *KVPRESS_MASKING_NAMES) and self.decoding_interval is None
        )

    @property
    def is_mixkv_press(self) -> bool:
        """Whether the method is a press of this library (not the full cache, not kvpress)."""
        return self.press_method not in (*UNBUDGETED_METHODS, *KVPRESS_METHODS)

    @property
    def replays_a_prefill(self) -> bool:
        """Whether the method is a kvpress press, run by replaying its hooks on an example's
        recorded full-cache prefill (:mod:`mixkv.eval.replay`) instead of a prefill of its own."""
        return self.press_method in KVPRESS_METHODS


_MODIFIERS = {"chunk": "prefill_chunk_size", "decode": "decoding_interval"}


def parse_method(name: str) -> MethodVariant:
    """Split ``"<method>[+chunkN][+decodeN]"`` (see :class:`MethodVariant`); ValueError for an
    unknown method or modifier, or a modifier on ``full`` or a kvpress method."""
    press_method, *modifiers = name.strip().lower().split("+")
    if press_method not in METHODS:
        raise ValueError(f"Unknown method {press_method!r}; choose from: {', '.join(METHODS)}.")
    found: dict[str, int] = {}
    for modifier in modifiers:
        kind = modifier.rstrip("0123456789")
        size = modifier[len(kind) :]
        if kind not in _MODIFIERS or not size or int(size) < 1 or _MODIFIERS[kind] in found:
            raise ValueError(
                f"Method {name!r}: modifiers are +chunkN (prefill in chunks of N tokens) and +decodeN "
                "(re-compress every N tokens after the prompt), each at most once with N >= 1, e.g. "
                "mixkv-snapkv+chunk512."
            )
        found[_MODIFIERS[kind]] = int(size)
    if found and (press_method in UNBUDGETED_METHODS or press_method in KVPRESS_METHODS):
        raise ValueError(
            f"Method {name!r}: +chunk / +decode apply to mixkv presses, not to {press_method!r}."
        )
    return MethodVariant(press_method, **found)


def check_methods(
    methods: Sequence[str] | str, *, variants: bool = False, closed_book: bool = False
) -> list[str]:
    """Normalised method names; ValueError for unknown ones or kvpress methods without kvpress.

    With ``variants`` a name may carry ``+chunkN`` / ``+decodeN`` (:func:`parse_method`); with
    ``closed_book`` (the text grid) :data:`CLOSED_BOOK` is accepted; otherwise those are refused."""
    out = [m.strip().lower() for m in as_list("methods", methods)]
    known = METHODS if closed_book else NAMES
    unknown = [m for m in out if m.split("+")[0] not in known]
    if any(m.split("+")[0] == CLOSED_BOOK for m in unknown):
        raise ValueError(
            f"{CLOSED_BOOK!r} (the question without its context) is a method of the text task grid "
            "(`mixkv eval` on text tasks) only; drop it here."
        )
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from: {', '.join(known)}.")
    for m in (m for m in out if "+" in m):
        if not variants:
            raise ValueError(
                f"Method {m!r}: +chunk / +decode variants are supported by the text grid only; "
                "drop the modifier."
            )
        parse_method(m)
    wanted_kvpress = [m for m in out if m in KVPRESS_METHODS]
    if wanted_kvpress and not kvpress_available():
        raise ValueError(
            f"Method(s) {wanted_kvpress} need NVIDIA's kvpress, which is not importable; "
            "`pip install kvpress` or drop them."
        )
    return out


def check_compare(compare: Sequence[tuple[str, str]], methods: Sequence[str]) -> list[tuple[str, str]]:
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
def progress(total: int) -> Iterator[Any]:
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


def _mean_score(records: Sequence[dict[str, Any]]) -> float:
    return sum(r["score"] for r in records) / len(records)


def run_eval(
    model_spec: str | tuple[Any, Any] | None = None,
    methods: Sequence[str] = ("full", "snapkv", "mixkv-snapkv"),
    budgets: Sequence[int] = (64, 128),
    tasks: Sequence[str] = ("niah_single_1",),
    context_lengths: Sequence[int] = (1024,),
    n: int = 5,
    seed: int = 0,
    out_dir: str | Path = "mixkv_results",
    protocol: str | Sequence[str] = "query_agnostic",
    resume: bool = True,
    *,
    window_size: int = 32,
    max_new_tokens: int | None = None,
    share_prefill: bool = True,
    batch_decoding: bool = True,
    dtype: str = "float32",
    compare: Sequence[tuple[str, str]] = (),
    report_only: bool = False,
    resume_from: str | Path | None = None,
) -> EvalResult:
    """Run (or resume) an evaluation grid and write per-cell JSON, a Markdown table and plots.

    Parameters
    ----------
    model_spec
        What :func:`mixkv.model_loading.load_model` accepts (None = SmolLM2-135M-Instruct), or an already
        loaded ``(model, tokenizer)`` pair. The model is loaded only if some cell must be computed.
    methods
        Names from :data:`METHODS`. ``"full"`` and ``"closed-book"`` (the question without its
        context) run once per (task, context length). A mixkv press's
        name may carry ``+chunkN`` / ``+decodeN`` (chunked prefill, bounded decoding; see
        :class:`MethodVariant`).
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
        Output directory: ``cells/*.json``, ``results.md``, ``examples.csv``,
        ``score_vs_budget_L*.png``; with several protocols, those of each in
        ``out_dir/<protocol>/`` (as a run of that protocol alone with that ``out_dir`` writes
        them, so either resumes the other) and ``protocols.md`` comparing them.
    protocol
        ``"query_agnostic"`` (compress the context before the question is known) or
        ``"query_aware"`` (compress the prompt with the question in the observation window), or
        several: each example's shared prefix (the context but its last ``window_size`` tokens)
        is then prefilled once for all of them, which on long contexts is most of an example's
        cost. The returned result holds every protocol's cells (file names prefixed with the
        protocol) and ``table_path`` is ``protocols.md``.
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
        kvpress methods get the completed full-cache prefill with every attention module's
        recorded inputs and run their hooks on a copy (:mod:`mixkv.eval.replay`): kvpress
        compresses after each layer has attended, so a prefill of their own computes the same
        inputs. False prefills every (method, budget) from scratch.
    batch_decoding
        Decode the answers of an example's cells as one batch when a mixkv press is among them
        (all but kvpress's key-masking presses and ``+decodeN`` variants: the full cache,
        kvpress's SnapKV and KeyDiff join), one weight pass per step for all of them
        (:func:`~mixkv.eval.example.run_examples_together`); outputs equal one-by-one decoding up
        to float rounding (decoding is most of a cell's time on a CPU). Records then say
        ``decode_batch``, and ``decode_seconds`` is the batch's time per cell. False decodes every
        cell on its own. Models with sliding-window layers always do.
    dtype
        ``"float32"`` or ``"bfloat16"``: parameter dtype of a model loaded by name or path (part of
        every cell's identity, so results of different dtypes never mix). For a model passed in,
        its own dtype is recorded.
    compare
        Method pairs ``(A, B)`` to compare on the same examples in ``results.md`` (B - A with a
        paired-bootstrap 95% CI, wins / ties / losses, exact sign test), besides every MixKV method
        against its base, which is always compared when both are run. Both must be in ``methods``.
    report_only
        Compute nothing and load no model: write ``results.md`` and the plots from the finished
        cells and the checkpoints of unfinished ones (:func:`~mixkv.eval.cell_store.cells_so_far`),
        e.g. to look at a long run in progress. No file is changed besides the report.
    resume_from
        A published run (a directory with the ``examples.csv`` and ``run.json`` this function
        writes; with several protocols, one ``resume_from/<protocol>`` per protocol, of which those
        present are used): its per-example records become this run's checkpoints where they go
        further than ``out_dir`` holds (:func:`~mixkv.eval.cell_store.resume_from_published`), so a
        long sweep continues on another machine from its published records. Used only with the
        same identity (model, dtype, seed, protocol, window, answer length) and, as any checkpoint,
        only as far as each record's ``example_sha1`` is the regenerated example's.

    Returns
    -------
    EvalResult

    Raises
    ------
    ValueError
        Unknown method / task / protocol, kvpress methods without kvpress, a ``compare`` pair not
        made of two of ``methods``, a ``resume_from`` that cannot be used (no records, another
        identity; also with ``report_only`` or without ``resume``), non-positive budgets,
        lengths or ``n``, or a grid where every compressed cell has a budget not below its context
        length.
    """
    from mixkv.model_loading import parse_dtype

    methods = check_methods(methods, variants=True, closed_book=True)
    variants = {m: parse_method(m) for m in methods}
    compare = check_compare(compare, methods)
    torch_dtype = parse_dtype(dtype)
    if isinstance(model_spec, tuple):
        torch_dtype = next(model_spec[0].parameters()).dtype
    dtype_name = str(torch_dtype).removeprefix("torch.")
    budgets = sorted({int(b) for b in as_list("budgets", budgets)})
    tasks = as_list("tasks", tasks)
    context_lengths = [int(x) for x in as_list("context_lengths", context_lengths)]
    bad_tasks = [t for t in tasks if t not in TASKS]
    if bad_tasks:
        raise ValueError(f"Unknown task(s) {bad_tasks}; choose from: {', '.join(TASKS)}.")
    protocols = _check_protocols(protocol)
    if any(b < 1 for b in budgets):
        raise ValueError(f"Budgets must be positive token counts, got {budgets}.")
    if any(x < 16 for x in context_lengths):
        raise ValueError(f"Context lengths must be at least 16 tokens, got {context_lengths}.")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    if any(v.decoding_interval for v in variants.values()) and budgets[0] <= window_size:
        raise ValueError(
            f"+decode methods cut the cache back to the budget while decoding, which must exceed the "
            f"observation window ({window_size}); got budget {budgets[0]}. Use larger budgets or a smaller "
            "window_size."
        )

    skipped: list[tuple[str, str]] = []
    cells: list[Cell] = []
    for length in context_lengths:
        for task in tasks:
            for method in methods:
                if method in UNBUDGETED_METHODS:
                    cells.append(Cell(method, None, task, length))
                    continue
                for b in budgets:
                    if b >= length:
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
        m not in UNBUDGETED_METHODS for m in methods
    ):
        raise ValueError(
            f"Every budget {budgets} is >= every context length {context_lengths}: nothing would be "
            "compressed. Use smaller budgets or longer contexts."
        )

    sources = _published_sources(resume_from, protocols, report_only=report_only, resume=resume)
    out = Path(out_dir)
    # One protocol: the run's files in out_dir; several: each protocol's in out_dir/<protocol>,
    # exactly as a run of that protocol alone with that --out writes them (either resumes the other).
    outs = {p: out if len(protocols) == 1 else out / p for p in protocols}
    results = {p: EvalResult(skipped=list(skipped)) for p in protocols}
    run_configs: dict[str, dict[str, Any]] = {}
    identities: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, Cell]] = []
    finished: dict[str, dict[Cell, dict[str, Any]]] = {}
    for p in protocols:
        (outs[p] / "cells").mkdir(parents=True, exist_ok=True)
        run_configs[p] = {
            "model": model_identity(model_spec),
            "methods": methods,
            "budgets": budgets,
            "tasks": tasks,
            "context_lengths": context_lengths,
            "n": n,
            "seed": seed,
            "protocol": p,
            "window_size": window_size,
            "max_new_tokens": max_new_tokens,
            "share_prefill": share_prefill,
            "batch_decoding": batch_decoding,
            "dtype": dtype_name,
        }
        identities[p] = {  # n is not part of it: a finished cell with fewer examples is extended, not redone
            "model": run_configs[p]["model"],
            "dtype": dtype_name,
            "seed": seed,
            "protocol": p,
            "window_size": window_size,
            "max_new_tokens": max_new_tokens,
        }
        expected = _expected(identities[p], n)
        write_run_identity(outs[p], identities[p], run_configs[p])
        if p in sources:
            seeded = resume_from_published(sources[p], cells, outs[p] / "cells", identities[p])
            logger.info("%s: %d cell(s) resume from %s.", p, len(seeded), sources[p])
        if report_only:
            finished[p] = cells_so_far(
                cells, outs[p] / "cells", expected, lambda cell, records: _mean_score(records)
            )
        else:
            to_compute, finished[p] = plan_cells(cells, outs[p] / "cells", expected, resume, results[p])
            todo += [(p, cell) for cell in to_compute]

    if todo:
        if isinstance(model_spec, tuple):
            model, tokenizer = model_spec
        else:
            from mixkv.model_loading import load_model

            model, tokenizer = load_model(model_spec, dtype=torch_dtype)
        layout = describe_decoder(model)
        # Sliding-window caches evict as they grow: such models decode every cell on its own.
        stackable = batch_decoding and len(layout.compressible_layers) == layout.num_layers
        versions, machine = software_versions(), machine_info()
        # Example-major order within each (task, context length): an example's shared prefix is
        # prefilled once and serves every pending cell of every protocol; the cells are written
        # when the group ends.
        groups: dict[tuple[str, int], list[tuple[str, Cell]]] = {}
        for p, cell in todo:
            assert cell.context_length is not None
            groups.setdefault((cell.task, cell.context_length), []).append((p, cell))
        with progress(len(todo) * n) as bar:
            for (task, length), group in groups.items():
                bar.set_description(f"{task} L={length}")
                examples = make_examples(task, tokenizer, length, n, seed)
                digests = [e.digest for e in examples]
                records: dict[tuple[str, Cell], list[dict[str, Any]]] = {}
                seconds: dict[tuple[str, Cell], float] = {}
                for p, cell in group:
                    records[p, cell], seconds[p, cell] = (
                        load_partial(outs[p] / "cells", cell, identities[p], digests) if resume else ([], 0.0)
                    )
                    bar.update(len(records[p, cell]))
                for i, example in enumerate(examples):
                    pending = [key for key in group if len(records[key]) == i]
                    if not pending:
                        continue
                    prefix = _shared_prefix(
                        model,
                        tokenizer,
                        example,
                        [(p, variants[cell.method]) for p, cell in pending],
                        share_prefill=share_prefill,
                        window_size=window_size,
                    )
                    for p in protocols:
                        cells_now = [cell for q, cell in pending if q == p]
                        if not cells_now:
                            continue
                        for cell, record, spent in _run_cells(
                            model,
                            tokenizer,
                            example,
                            cells_now,
                            variants,
                            protocol=p,
                            prefix=prefix,
                            stackable=stackable,
                            seed=seed,
                            window_size=window_size,
                            max_new_tokens=max_new_tokens,
                        ):
                            records[p, cell].append(record)
                            seconds[p, cell] += spent
                            bar.update(1)
                        for cell in cells_now:  # an interrupted run resumes after the last finished example
                            save_partial(
                                outs[p] / "cells", cell, identities[p], records[p, cell], seconds[p, cell]
                            )
                for p, cell in group:
                    finished[p][cell] = write_cell(
                        outs[p] / "cells",
                        cell,
                        identity=identities[p],
                        config=run_configs[p],
                        records=records[p, cell],
                        score=_mean_score(records[p, cell]),
                        wall_seconds=seconds[p, cell],
                        seed=seed,
                        versions=versions,
                        machine=machine,
                    )
                    partial_path(outs[p] / "cells", cell).unlink(missing_ok=True)
                    results[p].computed.append(cell.name)

    for p in protocols:
        write_summary(
            results[p],
            cells,
            finished[p],
            outs[p],
            methods=methods,
            budgets=budgets,
            tasks=tasks,
            context_lengths=context_lengths,
            compare=compare,
        )
    if len(protocols) == 1:
        return results[protocols[0]]
    return _protocols_result(results, outs, out)


def _expected(identity: dict[str, Any], n: int) -> Callable[[Cell], tuple[dict[str, Any], int]]:
    """What a cell file of this run must carry: its identity and its number of examples."""
    return lambda cell: (identity, n)


def _published_sources(
    resume_from: str | Path | None, protocols: Sequence[str], *, report_only: bool, resume: bool
) -> dict[str, Path]:
    """Each protocol's published run to resume from (see ``run_eval``'s ``resume_from``)."""
    if resume_from is None:
        return {}
    if report_only or not resume:
        raise ValueError("resume_from continues a run: it cannot go with report_only or without resume.")
    root = Path(resume_from)
    sources = {p: root if len(protocols) == 1 else root / p for p in protocols}
    sources = {p: path for p, path in sources.items() if (path / "examples.csv").is_file()}
    if not sources:
        where = str(root) if len(protocols) == 1 else " or ".join(str(root / p) for p in protocols)
        raise ValueError(f"Nothing to resume from: no examples.csv in {where}.")
    return sources


def _check_protocols(protocol: str | Sequence[str]) -> list[str]:
    """The protocols of a run, in order, without repeats."""
    protocols = list(dict.fromkeys([protocol] if isinstance(protocol, str) else protocol))
    bad = [p for p in protocols if p not in PROTOCOLS]
    if not protocols or bad:
        raise ValueError(f"protocol must be one or more of {PROTOCOLS}, got {protocol!r}.")
    return protocols


def _shared_prefix(
    model: Any,
    tokenizer: Any,
    example: Any,
    pending: Sequence[tuple[str, MethodVariant]],
    *,
    share_prefill: bool,
    window_size: int,
) -> SharedPrefix | None:
    """The full-cache prefix the ``(protocol, method)`` cells pending on ``example`` share, if any
    continues or replays one: all but the last ``window_size`` tokens of the shortest prefill among
    their protocols (the context, when the question comes after compression), so one forward
    serves both protocols; a longer prefill continues it with a longer tail."""
    if not share_prefill:
        return None
    continues = any(variant.continues_a_prefix for _, variant in pending)
    replays = any(variant.replays_a_prefill for _, variant in pending)
    if not (continues or replays):
        return None
    protocols = dict.fromkeys(p for p, _ in pending)
    shortest = min(protocols, key=lambda p: prompt_ids(example, tokenizer, p, model.device)[1])
    return prefill_shared_prefix(
        model, tokenizer, example, protocol=shortest, tail_tokens=window_size, record_inputs=replays
    )


def _run_cells(
    model: Any,
    tokenizer: Any,
    example: Any,
    cells: Sequence[Cell],
    variants: dict[str, MethodVariant],
    *,
    protocol: str,
    prefix: SharedPrefix | None,
    stackable: bool,
    seed: int,
    window_size: int,
    max_new_tokens: int | None,
) -> Iterator[tuple[Cell, dict[str, Any], float]]:
    """Run ``cells`` on one example under ``protocol``: ``(cell, record, seconds)`` as each ends.

    Cells whose method continues the shared ``prefix`` copy it; kvpress cells replay one full-cache
    prefill recorded from it; the cells that decode together (with at least one mixkv press
    among them, ``stackable`` models only) are answered as one batch, the mixkv presses sharing one
    tail forward, their seconds split evenly.
    """
    ids, prefill_tokens = prompt_ids(example, tokenizer, protocol, model.device)
    replays = prefix is not None and any(variants[c.method].replays_a_prefill for c in cells)
    recorded = prefill_with_inputs(model, ids, prefill_tokens, prefix) if replays else None

    def joins(variant: MethodVariant) -> bool:
        """Whether the cell can be decoded in the batch: kvpress ones from the recorded prefill,
        the full cache from the shared prefix (without them, they prefill on their own)."""
        if variant.replays_a_prefill:
            return recorded is not None
        return variant.is_mixkv_press or prefix is not None

    # A batch is decoded in a mixkv press's session: without one, every cell decodes on its own.
    together = [
        c for c in cells if stackable and variants[c.method].decodes_together and joins(variants[c.method])
    ]
    if len(together) < 2 or not any(variants[c.method].is_mixkv_press for c in together):
        together = []
    for cell in (c for c in cells if c not in together):
        torch.manual_seed(seed)
        variant = variants[cell.method]
        if variant.press_method == CLOSED_BOOK:
            start = time.perf_counter()
            record = run_closed_book(
                model, tokenizer, example, protocol=protocol, max_new_tokens=max_new_tokens
            )
            yield cell, record, time.perf_counter() - start
            continue
        press = variant.press(cell.budget, context_tokens=prefill_tokens, window_size=window_size)
        start = time.perf_counter()
        record = run_example(
            model,
            tokenizer,
            example,
            press,
            protocol=protocol,
            max_new_tokens=max_new_tokens,
            prefix=prefix if variant.continues_a_prefix else None,
            prefill_chunk_size=variant.prefill_chunk_size,
            recorded=recorded if variant.replays_a_prefill else None,
        )
        yield cell, record, time.perf_counter() - start
    if together:
        start = time.perf_counter()
        batch = run_examples_together(
            model,
            tokenizer,
            example,
            [
                variants[c.method].press(c.budget, context_tokens=prefill_tokens, window_size=window_size)
                for c in together
            ],
            protocol=protocol,
            max_new_tokens=max_new_tokens,
            prefix=prefix,
            prefill_chunk_sizes=[variants[c.method].prefill_chunk_size for c in together],
            seed=seed,
            recorded=recorded,
        )
        share = (time.perf_counter() - start) / len(together)
        for cell, record in zip(together, batch, strict=True):
            yield cell, record, share


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
            lines += compare_runs(outs[first], outs[p])
        except ValueError as exc:  # nothing in common yet
            lines += [f"{p} against {first}: {exc}", ""]
    merged.table_path = out / "protocols.md"
    merged.table_path.write_text("\n".join(lines), encoding="utf-8")
    return merged
