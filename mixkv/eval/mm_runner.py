"""The multimodal evaluation grid: methods x budgets over image and video question answering.

A *task* is a named list of :class:`~mixkv.eval.mm_example.MMExample` (:mod:`mixkv.eval.mm_tasks`).
Each *cell* (method, budget, task) runs every example of the task on a vision-language model, as
:mod:`mixkv.eval.mm_example` describes: the whole prompt (visual tokens and question) is
prefilled and compressed at once (the text grid's ``query_aware`` protocol), the answer generated
greedily and scored with the task's metric; a cell's ``score`` is the task's metric on all its
examples (in [0, 1], CIDEr-D on its toolkit scale). Records of video examples hold
``video_tokens`` (placeholders in the prompt) and ``video_tokens_total`` / ``video_tokens_kept``
beside the image counts.

:class:`MultimodalGrid` is what is specific to these examples; cell files, resume (finished cells
are read back, corrupt or stale files set aside and recomputed), ``results.md`` and the plot are
the engine's (:mod:`mixkv.eval.grid`); cell files are named ``<method>__b<budget>__<task>.json``.
A cell is stale when the model, seed, window, generation length, coordinate scale or the task's
examples (ids, questions, answers, image files) changed. Prompts are not truncated, so an example
whose prompt is not longer than the budget is run uncompressed (its record says
``compressed: false``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixkv.eval.cell_store import Cell, EvalResult, model_identity
from mixkv.eval.grid import GridSpec, check_budgets, run_grid
from mixkv.eval.methods import (
    KVPRESS_METHODS,
    check_compare,
    check_methods,
    reconstructs_the_prompt,
    scores_a_whole_forward,
)
from mixkv.eval.mm_example import MMExample, score_examples
from mixkv.eval.mm_example_run import (
    decoder_inputs,
    encode_example,
    example_prompt,
    prefill_image_prefix,
    primary_score,
    run_mm_example,
    run_mm_examples_together,
)
from mixkv.eval.text_example_run import SharedPrefix
from mixkv.integration.chat_prompts import build_mm_prompt, tokenizer_of
from mixkv.integration.decoder_layout import describe_decoder
from mixkv.presses.registry import build_press

__all__ = ["MultimodalGrid", "MultimodalSettings", "observation_window", "run_mm_eval"]

#: The one protocol of the multimodal grid: prompts are compressed whole, question included.
PROTOCOL = "query_aware"


@dataclass(frozen=True)
class MultimodalSettings:
    """How the multimodal grid runs its examples (:func:`run_mm_eval`'s parameters of the same names).

    Attributes
    ----------
    window_size
        Observation window of the presses (at most half the budget, :func:`observation_window`),
        and the tail prefilled after a shared prefix.
    max_new_tokens
        Generated tokens per example (None: by metric).
    coordinate_scale
        Coordinate convention of ``point_in_box`` outputs.
    share_prefill
        Prefill each example's shared prefix once for every mixkv cell.
    batch_decoding
        Answer the cells that continue the shared prefix as one batch (:func:`run_mm_eval`).
    head_table
        The SparseMM methods' visual-head scores, or None.
    sources
        Where each task's data came from, recorded in the configuration.
    device
        Where a model loaded from its directory runs (a model passed in: where it is); recorded.
    """

    window_size: int
    max_new_tokens: int | None
    coordinate_scale: str
    share_prefill: bool
    head_table: torch.Tensor | None
    sources: Mapping[str, Any]
    device: str = "cpu"
    batch_decoding: bool = True


@dataclass(frozen=True)
class _EncodedExample:
    """An example's processor inputs, its shared full-cache prefix (or None) and its digest."""

    inputs: dict[str, Any]
    prefix: SharedPrefix | None
    digest: str
    #: The prompt's decoder inputs, which KVzip's repeat reads when continuing ``prefix``.
    decoder_inputs: torch.Tensor | None = None
    #: KVzip's reconstruction scores of this example, shared by its budgets' cells.
    reconstructions: dict[tuple[Any, ...], Any] = field(default_factory=dict)


class MultimodalGrid:
    """The multimodal grid's :class:`~mixkv.eval.grid.GridAdapter`: each task's given examples, run
    on a vision-language model with its processor's prompt, scored by the task's metric.

    Parameters
    ----------
    spec
        The grid (one protocol, :data:`PROTOCOL`; no context lengths).
    datasets
        Task name -> its examples.
    settings
        How the examples run.
    """

    def __init__(
        self, spec: GridSpec, datasets: Mapping[str, Sequence[MMExample]], settings: MultimodalSettings
    ) -> None:
        self.spec = spec
        self.datasets = datasets
        self.settings = settings
        base_identity = {
            "kind": "multimodal",
            "model": model_identity(spec.model),
            "seed": spec.seed,
            "protocol": PROTOCOL,
            "window_size": settings.window_size,
            "max_new_tokens": settings.max_new_tokens,
            "coordinate_scale": settings.coordinate_scale,
        }
        table = settings.head_table
        self._head_digest = None if table is None else hashlib.sha1(table.numpy().tobytes()).hexdigest()
        self._task_identities = {
            t: {**base_identity, "task_examples": len(datasets[t]), "task_sha1": _fingerprint(datasets[t])}
            for t in spec.tasks
        }
        self._config = {
            **base_identity,
            "methods": list(spec.methods),
            "budgets": list(spec.budgets),
            "tasks": list(spec.tasks),
            "n": {t: len(datasets[t]) for t in spec.tasks},
            "sources": json.loads(json.dumps(dict(settings.sources), default=str)),
            "share_prefill": settings.share_prefill,
            "batch_decoding": settings.batch_decoding,
            "device": settings.device,
        }
        self.model: Any = None
        self.processor: Any = None
        self._prompt_format = ""

    def identity(self, protocol: str, cell: Cell) -> dict[str, Any]:
        # Only SparseMM cells depend on the head scores: other cells stay reusable across runs with
        # and without --head-scores.
        if self._head_digest is None or "sparsemm" not in cell.method:
            return self._task_identities[cell.task]
        return {**self._task_identities[cell.task], "head_scores_sha1": self._head_digest}

    def examples_per_cell(self, cell: Cell) -> int:
        return len(self.datasets[cell.task])

    def run_identity(self, protocol: str) -> None:
        return None  # cells of different tasks carry different identities

    def cell_config(self, protocol: str) -> dict[str, Any]:
        return {**self._config, "prompt_format": self._prompt_format}

    def _scores(self, cell: Cell, records: list[dict[str, Any]]) -> dict[str, float]:
        outputs = [r["output"] for r in records]
        examples = self.datasets[cell.task][: len(records)]
        return score_examples(examples, outputs, coordinate_scale=self.settings.coordinate_scale)

    def score(self, cell: Cell, records: list[dict[str, Any]]) -> float:
        return primary_score(self._scores(cell, records))

    def finished_cell(self, cell: Cell, records: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
        scores = self._scores(cell, records)
        return primary_score(scores), {"scores": scores, **_visual_token_means(records)}

    def load_model(self) -> None:
        if isinstance(self.spec.model, tuple):
            self.model, self.processor = self.spec.model
        else:
            from mixkv.model_loading import load_model

            self.model, self.processor = load_model(self.spec.model, device=self.settings.device)
            _check_vlm(self.model, self.processor, str(self.spec.model))
        self._prompt_format = build_mm_prompt(self.processor, "?")[1]

    def examples(self, task: str, context_length: int | None) -> list[MMExample]:
        return list(self.datasets[task])

    def digest(self, example: MMExample) -> str:
        return _fingerprint([example])

    def prepare(self, example: MMExample, pending: Sequence[tuple[str, Cell]]) -> _EncodedExample:
        """The example encoded once for every pending cell, and its shared prefix when a mixkv cell
        can continue it."""
        inputs = encode_example(
            self.processor, example, example_prompt(self.processor, example), self.model.device
        )
        prefix = None
        if self.settings.share_prefill and any(_continues_a_prefix(c.method) for _, c in pending):
            prefix = prefill_image_prefix(self.model, inputs, tail_tokens=self.settings.window_size)
        embeddings = None
        if prefix is not None and any(reconstructs_the_prompt(c.method) for _, c in pending):
            embeddings = (
                prefix.embeddings if prefix.embeddings is not None else decoder_inputs(self.model, inputs)
            )
        return _EncodedExample(inputs, prefix, self.digest(example), embeddings)

    def run_cells(
        self, example: MMExample, prepared: _EncodedExample, protocol: str, cells: Sequence[Cell]
    ) -> Iterator[tuple[Cell, dict[str, Any], float]]:
        """Run ``cells`` on one example: ``(cell, record, seconds)`` as each ends. With batched
        decoding, the cells that continue the shared prefix (the full cache and mixkv presses) are
        answered as one batch when the prefix allows it (:func:`_decodes_together`), sharing one
        tail forward, their seconds split evenly; the others run one by one."""
        prefix = prepared.prefix
        together = (
            [c for c in cells if _continues_a_prefix(c.method) and not reconstructs_the_prompt(c.method)]
            if self._batches(prefix)
            else []
        )
        if len(together) < 2 or all(c.method == "full" for c in together):
            together = []
        for cell in (c for c in cells if c not in together):
            start = time.perf_counter()
            torch.manual_seed(self.spec.seed)  # per example, so a resumed cell draws what a whole run draws
            record = run_mm_example(
                self.model,
                self.processor,
                example,
                self._press(cell, prepared),
                max_new_tokens=self.settings.max_new_tokens,
                coordinate_scale=self.settings.coordinate_scale,
                inputs=prepared.inputs,
                prefix=prefix if _continues_a_prefix(cell.method) else None,
                prompt_embeddings=prepared.decoder_inputs if reconstructs_the_prompt(cell.method) else None,
            )
            yield cell, {**record, "example_sha1": prepared.digest}, time.perf_counter() - start
        if together:
            assert prefix is not None  # _batches(prefix)
            start = time.perf_counter()
            records = run_mm_examples_together(
                self.model,
                self.processor,
                example,
                [self._press(cell, prepared) for cell in together],
                inputs=prepared.inputs,
                prefix=prefix,
                max_new_tokens=self.settings.max_new_tokens,
                coordinate_scale=self.settings.coordinate_scale,
                seed=self.spec.seed,
            )
            share = (time.perf_counter() - start) / len(together)
            for cell, record in zip(together, records, strict=True):
                yield cell, {**record, "example_sha1": prepared.digest}, share

    def _press(self, cell: Cell, prepared: _EncodedExample) -> Any:
        press = build_press(
            cell.method,
            cell.budget,
            context_tokens=int(prepared.inputs["input_ids"].shape[1]),
            window_size=observation_window(self.settings.window_size, cell.budget),
            head_scores=self.settings.head_table,
            tokenizer=tokenizer_of(self.processor),
        )
        if reconstructs_the_prompt(cell.method):
            press.reconstruction_memo = prepared.reconstructions
        return press

    def _batches(self, prefix: SharedPrefix | None) -> bool:
        """Whether the cells continuing ``prefix`` are decoded as one batch: batched decoding on, a
        prefix at 1-D positions (not M-RoPE), and a model whose caches stack (no sliding-window
        layers)."""
        if not self.settings.batch_decoding or prefix is None or prefix.generation_state:
            return False
        layout = describe_decoder(self.model)
        return len(layout.compressible_layers) == layout.num_layers


def _continues_a_prefix(method: str) -> bool:
    """Whether the method's press continues the example's shared full-cache prefix: mixkv presses,
    not kvpress's (nor kvpress scorers run by mixkv, which score the whole prompt's forward)."""
    return method not in KVPRESS_METHODS and not scores_a_whole_forward(method)


def run_mm_eval(
    model_spec: str | tuple[Any, Any],
    tasks: Mapping[str, Sequence[MMExample]],
    methods: Sequence[str] = ("full", "snapkv", "mixkv-snapkv"),
    budgets: Sequence[int] = (64, 128),
    *,
    seed: int = 0,
    out_dir: str | Path = "mixkv_results",
    resume: bool = True,
    window_size: int = 32,
    max_new_tokens: int | None = None,
    coordinate_scale: str = "pixel",
    sources: Mapping[str, Any] | None = None,
    compare: Sequence[tuple[str, str]] = (),
    head_scores: str | Path | None = None,
    share_prefill: bool = True,
    batch_decoding: bool = True,
    report_only: bool = False,
    resume_from: str | Path | None = None,
    device: str = "cpu",
) -> EvalResult:
    """Run (or resume) methods x budgets over multimodal tasks; write cell JSON, results.md, a plot.

    Parameters
    ----------
    model_spec
        A local vision-language model directory (loaded with :func:`mixkv.model_loading.load_model`, only if
        some cell must be computed) or a loaded ``(model, processor)`` pair.
    tasks
        Task name -> its examples (see :func:`~mixkv.eval.mm_tasks.load_mm_task`).
    methods, budgets
        As for :func:`mixkv.eval.runner.run_eval` (``"full"`` runs once per task).
    seed
        Recorded, and ``torch``'s seed before each cell (for the random press).
    out_dir
        ``cells/*.json``, ``results.md``, ``score_vs_budget.png``.
    resume
        Reuse finished, valid cell files; with False every cell is recomputed.
    window_size
        Observation window of the presses; below a budget of ``2 * window_size`` the window is half
        the budget (budget 32: window 16), so that a press keeps as many chosen entries as recent ones.
    max_new_tokens
        Generated tokens per example (default: :data:`~mixkv.eval.mm_example_run.DEFAULT_NEW_TOKENS` of its metric).
    coordinate_scale
        Coordinate convention of ``point_in_box`` outputs (see ``score_examples``).
    sources
        Where each task's data came from (files, synthetic seed), recorded in the configuration.
    compare
        Method pairs compared on the same examples in ``results.md``, as for
        :func:`mixkv.eval.runner.run_eval`.
    head_scores
        A ``mixkv calibrate`` statistics file whose ``visual_head_scores`` the SparseMM-based methods
        use (required when one is run); its content's digest is part of the SparseMM cells' identity.
    share_prefill
        Prefill each example's prompt, all but its last ``window_size`` tokens (the image and most of
        the text), once with the full cache and give every mixkv method a copy (see
        :func:`~mixkv.eval.mm_example_run.prefill_image_prefix`); the press then compresses prefix and tail together, as in a
        one-go prefill. Up to the float rounding of the split forward this is the same computation,
        and the image is encoded and prefilled once per example instead of once per (method,
        budget). False prefills every cell from scratch; kvpress methods, and prompts whose last
        ``window_size`` tokens include an image token, always are.
    batch_decoding
        With a shared prefix, answer the full cache and every mixkv cell of an example as one batch
        (:func:`~mixkv.eval.mm_example_run.run_mm_examples_together`): one tail forward recorded and
        compressed by each press, one decoding batch; same answers up to the float rounding of
        batched products, faster on a CPU. Not for M-RoPE models (Qwen-VL) or models with
        sliding-window layers: their cells run one by one.
    report_only
        Compute nothing and load no model: report the finished cells and the checkpoints of
        unfinished ones, as for :func:`mixkv.eval.runner.run_eval`.
    resume_from
        A published run (the directory with this function's ``examples.csv`` and ``run.json``):
        its per-example records become this run's checkpoints, as for
        :func:`mixkv.eval.runner.run_eval`, for each cell computed with the same identity (model,
        seed, window, answer length, the task's examples and, for SparseMM, head scores). A cell's
        result is then rebuilt from the output, image and video tokens and timings the CSV holds.
    device
        Where a model loaded from its directory runs, as for :func:`mixkv.eval.runner.run_eval`.

    Returns
    -------
    mixkv.eval.cell_store.EvalResult

    Raises
    ------
    ValueError
        Unknown method, a ``compare`` pair not made of two of ``methods``, non-positive budgets,
        empty task, examples without reference answers, a text-only model, or a ``resume_from``
        that cannot be used (no records, or a cell computed with another identity).
    FileNotFoundError
        An example's image file is missing (the message names it).
    """
    methods = check_methods(methods)
    compare = check_compare(compare, methods)
    budgets = check_budgets(budgets)
    if not tasks:
        raise ValueError("tasks must not be empty.")
    for name, examples in tasks.items():
        if not examples:
            raise ValueError(f"Task {name!r} has no examples.")
        for ex in examples:
            for path in ex.frames or ex.image_paths:
                if not path.is_file():
                    raise FileNotFoundError(
                        f"Image file {path} of example {ex.id!r} (task {name}) not found."
                    )
            if not ex.answers and ex.metric != "point_in_box":
                raise ValueError(
                    f"Task {name!r}: example {ex.id!r} has no reference answers (a test split?)."
                )
    if isinstance(model_spec, tuple):
        _check_vlm(model_spec[0], model_spec[1], model_identity(model_spec))
    else:
        _precheck_model_dir(model_spec)
    head_table = None
    if head_scores is not None:
        from mixkv.presses.head_tables import resolve_head_table

        head_table = resolve_head_table(head_scores, "visual_head_scores")
    elif any("sparsemm" in m for m in methods):
        raise ValueError(
            "SparseMM methods need visual-head scores: measure them with `mixkv calibrate MODEL --prompts "
            "FILE --out FILE` and pass --head-scores FILE."
        )
    spec = GridSpec(
        model=model_spec,
        methods=tuple(methods),
        budgets=tuple(budgets),
        tasks=tuple(tasks),
        context_lengths=(None,),
        protocols=(PROTOCOL,),
        seed=seed,
        out_dir=Path(out_dir),
        resume=resume,
        report_only=report_only,
        compare=tuple(compare),
        resume_from=None if resume_from is None else Path(resume_from),
    )
    settings = MultimodalSettings(
        window_size=window_size,
        max_new_tokens=max_new_tokens,
        coordinate_scale=coordinate_scale,
        share_prefill=share_prefill,
        batch_decoding=batch_decoding,
        head_table=head_table,
        sources=sources or {},
        device=str(next(model_spec[0].parameters()).device) if isinstance(model_spec, tuple) else device,
    )
    return run_grid(spec, MultimodalGrid(spec, tasks, settings))


def observation_window(window_size: int, budget: int | None) -> int:
    """The window a press uses at ``budget``: ``window_size``, or half the budget when that is smaller."""
    return window_size if budget is None else max(1, min(window_size, budget // 2))


def _fingerprint(examples: Sequence[MMExample]) -> str:
    """Digest of examples: ids, questions, answers, metric, image (and frame) names and sizes."""
    h = hashlib.sha1()
    for ex in examples:
        size = ex.image_path.stat().st_size if ex.image_path.is_file() else -1
        frames = [(f.name, f.stat().st_size if f.is_file() else -1) for f in ex.frames]
        h.update(repr((ex.id, ex.question, list(ex.answers), ex.metric, ex.image_path.name, size)).encode())
        if frames:  # image examples keep their fingerprint (and finished cells) from before
            h.update(repr(frames).encode())
        if ex.more_images:  # so do one-image examples
            h.update(
                repr([(p.name, p.stat().st_size if p.is_file() else -1) for p in ex.more_images]).encode()
            )
        if ex.answer_prefix:
            h.update(repr(("answer_prefix", ex.answer_prefix)).encode())
    return h.hexdigest()


def _check_vlm(model: Any, processor: Any, name: str) -> None:
    from mixkv.model_loading import is_vlm_config

    if not is_vlm_config(model.config) or getattr(processor, "image_processor", None) is None:
        raise ValueError(
            f"{name} is a text-only model; multimodal tasks need a vision-language model "
            "(a model directory whose config has a vision_config, with its processor files)."
        )


def _precheck_model_dir(model_spec: str | None) -> None:
    """Reject text-only models named by alias or directory before loading any weights."""
    from mixkv.model_loading import MODEL_ALIASES, VLM_ALIASES, is_vlm_config

    msg = "{} is a text-only model; multimodal tasks need a vision-language model."
    if model_spec is None or model_spec.strip().lower() in {
        *(set(MODEL_ALIASES) - VLM_ALIASES),
        "default",
        "gemma3",
        "gemma-3-270m",
    }:
        raise ValueError(msg.format(model_spec or "smollm2 (the default model)"))
    path = Path(model_spec).expanduser()
    if path.suffix == ".gguf":
        raise ValueError(msg.format(model_spec))
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        if not is_vlm_config(AutoConfig.from_pretrained(str(path))):
            raise ValueError(msg.format(model_spec))


def _visual_token_means(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    keys = ("image_tokens_total", "image_tokens_kept", "video_tokens_total", "video_tokens_kept")
    return {f"{key}_mean": sum(r[key] for r in records) / len(records) for key in keys}
