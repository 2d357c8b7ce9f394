"""The text evaluation grid: methods x budgets x tasks x context lengths.

Each *cell* (method, budget, task, context length) runs ``n`` seeded examples of a task from
:mod:`mixkv.eval.tasks`. For every example the prompt is prefilled once with the press active
(that is when the cache is compressed) and the answer is decoded greedily from the compressed
cache (:mod:`mixkv.eval.text_example_run`). :class:`TextGrid` is what is specific to text examples; the
cells, their files, resume and reports are the engine's (:mod:`mixkv.eval.grid`).

Budgets at least as large as a cell's context length are skipped with a message (the press
would keep everything, so the cell would only repeat the full-cache result); the summary table
shows them as ``n/a``. A grid in which every compressed cell would be skipped is an error.

Besides the presses, the grid has two methods without a budget, run once per (task, context
length): ``full`` (the full cache) and ``closed-book`` (the question without its context: what
the model answers from memory or guesses, the floor a press must beat to have read anything).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixkv.eval.cell_store import Cell, EvalResult, model_identity
from mixkv.eval.grid import GridSpec, check_budgets, run_grid
from mixkv.eval.methods import (
    CLOSED_BOOK,
    MethodVariant,
    as_list,
    check_compare,
    check_methods,
    parse_method,
    reconstructs_the_prompt,
)
from mixkv.eval.replay import prefill_with_inputs
from mixkv.eval.tasks import TASKS, TextExample, make_examples
from mixkv.eval.text_example_run import (
    PROTOCOLS,
    SharedPrefix,
    prefill_shared_prefix,
    prompt_ids,
    run_closed_book,
    run_example,
    run_examples_together,
)
from mixkv.integration.decoder_layout import describe_decoder

__all__ = ["TextGrid", "TextSettings", "run_eval"]


@dataclass(frozen=True)
class TextSettings:
    """How the text grid runs its examples (:func:`run_eval`'s parameters of the same names).

    Attributes
    ----------
    n
        Examples per cell.
    window_size
        Observation window of the presses (and the tail prefilled after a shared prefix).
    max_new_tokens
        Overrides each task's generation length.
    share_prefill
        Prefill each example's shared prefix once for every cell.
    batch_decoding
        Decode an example's cells as one batch where they can be.
    dtype
        Parameter dtype of a model loaded by name (a model passed in: its own); recorded.
    device
        Where a model loaded by name runs (a model passed in: where it is); recorded.
    """

    n: int
    window_size: int
    max_new_tokens: int | None
    share_prefill: bool
    batch_decoding: bool
    dtype: torch.dtype
    device: str = "cpu"


class TextGrid:
    """The text grid's :class:`~mixkv.eval.grid.GridAdapter`: seeded examples of the text tasks,
    run under the query-agnostic or query-aware protocol, scored by their mean example score.

    Parameters
    ----------
    spec
        The grid (its methods are text grid method names, variants included).
    settings
        How the examples run.
    """

    def __init__(self, spec: GridSpec, settings: TextSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.variants = {m: parse_method(m) for m in spec.methods}
        dtype_name = str(settings.dtype).removeprefix("torch.")
        model = model_identity(spec.model)
        self._configs = {
            p: {
                "model": model,
                "methods": list(spec.methods),
                "budgets": list(spec.budgets),
                "tasks": list(spec.tasks),
                "context_lengths": list(spec.context_lengths),
                "n": settings.n,
                "seed": spec.seed,
                "protocol": p,
                "window_size": settings.window_size,
                "max_new_tokens": settings.max_new_tokens,
                "share_prefill": settings.share_prefill,
                "batch_decoding": settings.batch_decoding,
                "dtype": dtype_name,
                "device": settings.device,
            }
            for p in spec.protocols
        }
        self._identities = {  # n is not part of it: a finished cell with fewer examples is extended, not redone
            p: {
                "model": model,
                "dtype": dtype_name,
                "seed": spec.seed,
                "protocol": p,
                "window_size": settings.window_size,
                "max_new_tokens": settings.max_new_tokens,
            }
            for p in spec.protocols
        }
        self.model: Any = None
        self.tokenizer: Any = None
        self.stackable = False

    def identity(self, protocol: str, cell: Cell) -> dict[str, Any]:
        return self._identities[protocol]

    def examples_per_cell(self, cell: Cell) -> int:
        return self.settings.n

    def run_identity(self, protocol: str) -> dict[str, Any]:
        return self._identities[protocol]

    def cell_config(self, protocol: str) -> dict[str, Any]:
        return self._configs[protocol]

    def score(self, cell: Cell, records: list[dict[str, Any]]) -> float:
        return sum(r["score"] for r in records) / len(records)

    def finished_cell(self, cell: Cell, records: list[dict[str, Any]]) -> tuple[float, None]:
        return self.score(cell, records), None

    def load_model(self) -> None:
        if isinstance(self.spec.model, tuple):
            self.model, self.tokenizer = self.spec.model
        else:
            from mixkv.model_loading import load_model

            self.model, self.tokenizer = load_model(
                self.spec.model, dtype=self.settings.dtype, device=self.settings.device
            )
        layout = describe_decoder(self.model)
        # Sliding-window caches evict as they grow: such models decode every cell on its own.
        self.stackable = self.settings.batch_decoding and len(layout.compressible_layers) == layout.num_layers

    def examples(self, task: str, context_length: int | None) -> list[TextExample]:
        assert context_length is not None
        return make_examples(task, self.tokenizer, context_length, self.settings.n, self.spec.seed)

    def digest(self, example: TextExample) -> str:
        return example.digest

    def prepare(self, example: TextExample, pending: Sequence[tuple[str, Cell]]) -> SharedPrefix | None:
        """The full-cache prefix the ``(protocol, cell)`` pairs pending on ``example`` share, if any
        continues or replays one: all but the last ``window_size`` tokens of the shortest prefill
        among their protocols (the context, when the question comes after compression), so one
        forward serves both protocols; a longer prefill continues it with a longer tail."""
        if not self.settings.share_prefill:
            return None
        variants = [self.variants[cell.method] for _, cell in pending]
        continues = any(variant.continues_a_prefix for variant in variants)
        replays = any(variant.replays_a_prefill for variant in variants)
        if not (continues or replays):
            return None
        protocols = dict.fromkeys(p for p, _ in pending)
        shortest = min(protocols, key=lambda p: prompt_ids(example, self.tokenizer, p, self.model.device)[1])
        return prefill_shared_prefix(
            self.model,
            self.tokenizer,
            example,
            protocol=shortest,
            tail_tokens=self.settings.window_size,
            record_inputs=replays,
        )

    def run_cells(
        self, example: TextExample, prepared: SharedPrefix | None, protocol: str, cells: Sequence[Cell]
    ) -> Iterator[tuple[Cell, dict[str, Any], float]]:
        """Run ``cells`` on one example under ``protocol``: ``(cell, record, seconds)`` as each ends.

        Cells whose method continues the shared prefix (``prepared``) copy it; kvpress cells replay
        one full-cache prefill recorded from it; the cells that decode together (with at least one
        mixkv press among them, on models whose caches stack) are answered as one batch, the mixkv
        presses sharing one tail forward, their seconds split evenly.
        """
        model, tokenizer, prefix = self.model, self.tokenizer, prepared
        seed, window_size, max_new_tokens = (
            self.spec.seed,
            self.settings.window_size,
            self.settings.max_new_tokens,
        )
        variants = self.variants
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
            c
            for c in cells
            if self.stackable and variants[c.method].decodes_together and joins(variants[c.method])
        ]
        if len(together) < 2 or not any(variants[c.method].is_mixkv_press for c in together):
            together = []
        # KVzip at several budgets reconstructs this prompt once: its scores do not depend on the budget.
        reconstructions: dict[tuple[Any, ...], Any] = {}
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
            press = variant.press(
                cell.budget, context_tokens=prefill_tokens, window_size=window_size, tokenizer=tokenizer
            )
            if reconstructs_the_prompt(variant.press_method):
                press.reconstruction_memo = reconstructions
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
                    variants[c.method].press(
                        c.budget, context_tokens=prefill_tokens, window_size=window_size, tokenizer=tokenizer
                    )
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
    device: str = "cpu",
) -> EvalResult:
    """Run (or resume) an evaluation grid and write per-cell JSON, a Markdown table and plots.

    Parameters
    ----------
    model_spec
        What :func:`mixkv.model_loading.load_model` accepts (None = SmolLM2-135M-Instruct), or an already
        loaded ``(model, tokenizer)`` pair. The model is loaded only if some cell must be computed.
    methods
        Names from :data:`~mixkv.eval.methods.METHODS`. ``"full"`` and ``"closed-book"`` (the question without its
        context) run once per (task, context length). A mixkv press's
        name may carry ``+chunkN`` / ``+decodeN`` (chunked prefill, bounded decoding; see
        :class:`~mixkv.eval.methods.MethodVariant`).
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
        cache and give every mixkv method a copy (see :func:`~mixkv.eval.text_example_run.prefill_shared_prefix`); the press
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
        (:func:`~mixkv.eval.text_example_run.run_examples_together`); outputs equal one-by-one decoding up
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
    device
        Where a model loaded by name or path runs: ``"cpu"`` (default), ``"cuda"``... (recorded in
        the run's configuration, not in the cells' identity: a device changes results only by
        float rounding). A model passed in runs where it is.

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
    variants = [parse_method(m) for m in methods]
    compare = check_compare(compare, methods)
    torch_dtype = parse_dtype(dtype)
    if isinstance(model_spec, tuple):
        torch_dtype = next(model_spec[0].parameters()).dtype
    budgets = check_budgets(budgets)
    tasks = as_list("tasks", tasks)
    context_lengths = [int(x) for x in as_list("context_lengths", context_lengths)]
    bad_tasks = [t for t in tasks if t not in TASKS]
    if bad_tasks:
        raise ValueError(f"Unknown task(s) {bad_tasks}; choose from: {', '.join(TASKS)}.")
    protocols = _check_protocols(protocol)
    if any(x < 16 for x in context_lengths):
        raise ValueError(f"Context lengths must be at least 16 tokens, got {context_lengths}.")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    if any(v.decoding_interval for v in variants) and budgets[0] <= window_size:
        raise ValueError(
            f"+decode methods cut the cache back to the budget while decoding, which must exceed the "
            f"observation window ({window_size}); got budget {budgets[0]}. Use larger budgets or a smaller "
            "window_size."
        )
    spec = GridSpec(
        model=model_spec,
        methods=tuple(methods),
        budgets=tuple(budgets),
        tasks=tuple(tasks),
        context_lengths=tuple(context_lengths),
        protocols=tuple(protocols),
        seed=seed,
        out_dir=Path(out_dir),
        resume=resume,
        report_only=report_only,
        resume_from=None if resume_from is None else Path(resume_from),
        compare=tuple(compare),
    )
    settings = TextSettings(
        n=n,
        window_size=window_size,
        max_new_tokens=max_new_tokens,
        share_prefill=share_prefill,
        batch_decoding=batch_decoding,
        dtype=torch_dtype,
        device=str(next(model_spec[0].parameters()).device) if isinstance(model_spec, tuple) else device,
    )
    return run_grid(spec, TextGrid(spec, settings))


def _check_protocols(protocol: str | Sequence[str]) -> list[str]:
    """The protocols of a run, in order, without repeats."""
    protocols = list(dict.fromkeys([protocol] if isinstance(protocol, str) else protocol))
    bad = [p for p in protocols if p not in PROTOCOLS]
    if not protocols or bad:
        raise ValueError(f"protocol must be one or more of {PROTOCOLS}, got {protocol!r}.")
    return protocols
