"""Resumable multimodal evaluation grid: methods x budgets over image and video question answering.

A *task* is a named list of :class:`~mixkv.eval.mm_example.MMExample` (a benchmark read from
local files by :mod:`mixkv.eval.mm_datasets`, or a seeded synthetic suite from
:mod:`mixkv.eval.synthetic_images`). Each *cell* (method, budget, task) runs every example of the
task on a vision-language model:

* the prompt is built by the model's own processor: ``processor.apply_chat_template`` with one
  user turn holding an image entry and the question (generation prompt added). When neither the
  processor nor its tokenizer has a chat template, the prompt is the processor's image placeholder
  (wrapped in ``<|vision_start|>...<|vision_end|>`` for Qwen-VL processors), a newline and the
  question; the processor expands the placeholder into image tokens in both cases;
* the answer is generated greedily with ``model.generate`` under the press, so the whole prompt
  (image tokens and question) is prefilled and compressed at once (the ``query_aware`` protocol of
  the text grid);
* a video example (``MMExample.frames``: Video-MME over extracted frames, the synthetic
  ``video_needle`` clips) gets a video entry instead, and its frames go to the processor as
  ``videos=[frames]``; that needs the processor's video processor (torchvision in transformers),
  and a processor without one is refused with a ``ValueError``. Records hold ``video_tokens``
  (placeholders in the prompt) and ``video_tokens_total`` / ``video_tokens_kept`` beside the image
  counts;
* outputs are scored with :func:`~mixkv.eval.mm_example.score_examples`; a cell's ``score`` is
  the task's metric on all its examples (in [0, 1], CIDEr-D on its toolkit scale).

Cell files, resume (finished cells are read back, corrupt or stale files set aside and
recomputed), ``results.md`` and the plot are the text grid's machinery in
:mod:`mixkv.eval.runner`; cell files are named ``<method>__b<budget>__<task>.json``. A cell is
stale when the model, seed, window, generation length, coordinate scale or the task's examples
(ids, questions, answers, image files) changed. Prompts are not truncated, so an example whose
prompt is not longer than the budget is run uncompressed (its record says ``compressed: false``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mixkv.eval import cell_store, reporting, runner
from mixkv.eval.example import SharedPrefix
from mixkv.eval.mm_datasets import (
    load_chartqa,
    load_docvqa,
    load_ocrbench,
    load_screenspot,
    load_textcaps,
    load_textvqa,
    load_videomme,
)
from mixkv.eval.mm_example import MMExample, score_examples
from mixkv.integration.cache import kv_cache_bytes
from mixkv.integration.decoder_layout import (
    cache_argument,
    find_cache,
    generation_state,
    prefill,
    restore_generation_state,
)
from mixkv.integration.kvpress_bridge import press_applied
from mixkv.presses.base import BasePress
from mixkv.presses.registry import build_press

__all__ = [
    "DATASET_TASKS",
    "MM_TASKS",
    "SYNTHETIC_TASK_NAMES",
    "TINY_VLM_TASKS",
    "build_mm_prompt",
    "load_mm_task",
    "observation_window",
    "prefill_image_prefix",
    "run_mm_eval",
    "run_mm_example",
]

logger = logging.getLogger("mixkv.eval")

#: Benchmarks read from local files (``data``: annotation file, ``images``: image folder).
DATASET_TASKS: tuple[str, ...] = (
    "docvqa",
    "textvqa",
    "chartqa",
    "ocrbench",
    "textcaps",
    "screenspot",
    "videomme",
)
#: Synthetic suites rendered on the fly (``synthetic_<name>`` for :func:`make_synthetic_suite`).
SYNTHETIC_TASK_NAMES: tuple[str, ...] = (
    "synthetic_text_reading",
    "synthetic_bar_chart",
    "synthetic_gui_grounding",
    "synthetic_video_needle",
)
#: The tiny VLM's families (:mod:`mixkv.eval.tiny_vlm_tasks`), held-out test images rendered on the fly.
TINY_VLM_TASKS: tuple[str, ...] = ("board_codes", "chart_values", "gui_marks")
#: Every multimodal task name.
MM_TASKS: tuple[str, ...] = DATASET_TASKS + SYNTHETIC_TASK_NAMES + TINY_VLM_TASKS

#: Generated tokens per example by metric (``max_new_tokens`` overrides).
DEFAULT_NEW_TOKENS: dict[str, int] = {
    "anls": 24,
    "vqa_accuracy": 16,
    "relaxed_accuracy": 16,
    "ocrbench": 24,
    "cider_d": 40,
    "point_in_box": 24,
    "multiple_choice": 8,
    "exact_match": 10,
    "mark_in_box": 4,
}

_LOADERS = {
    "textvqa": load_textvqa,
    "chartqa": load_chartqa,
    "ocrbench": load_ocrbench,
    "textcaps": load_textcaps,
    "screenspot": load_screenspot,
    "videomme": load_videomme,
}
_IMAGES_HINT = {
    "docvqa": "the dataset root the 'image' paths are relative to (default: the annotation file's folder)",
    "textvqa": "the folder with <image_id>.jpg (train_images/)",
    "chartqa": "the chart folder (test/png/)",
    "ocrbench": "the OCRBench_Images/ folder",
    "textcaps": "the folder with <image_id>.jpg (train_images/)",
    "screenspot": "the screenshot folder (screenspot_imgs/)",
    "videomme": "the frames folder holding <videoID>/ with each video's frame images",
}


# --------------------------------------------------------------------------------------------
# Tasks


def load_mm_task(
    task: str,
    *,
    data: str | Path | None = None,
    images: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    synthetic_dir: str | Path = "mixkv_results/synthetic_images",
) -> list[MMExample]:
    """Resolve a multimodal task name to its examples.

    Parameters
    ----------
    task
        One of :data:`MM_TASKS`.
    data
        Annotation file of a benchmark task (see the loaders in :mod:`mixkv.eval.mm_datasets`).
    images
        Image folder of a benchmark task (optional for ``docvqa``, where it is the dataset root).
    limit
        Keep the first ``limit`` examples; for synthetic tasks the number generated (default 5).
    seed
        Seed of the synthetic suites.
    synthetic_dir
        Where synthetic images are written (``<synthetic_dir>/<task>/``).

    Returns
    -------
    list of MMExample

    Raises
    ------
    ValueError
        Unknown task, or a benchmark task without the files it needs.
    FileNotFoundError
        Missing annotation file, image folder or image (the message names it).
    """
    if task in SYNTHETIC_TASK_NAMES:
        from mixkv.eval.synthetic_images import make_synthetic_suite, make_synthetic_video_suite

        name = task.removeprefix("synthetic_")
        if name == "video_needle":
            return make_synthetic_video_suite(limit or 5, seed, Path(synthetic_dir) / name)
        return make_synthetic_suite(name, limit or 5, seed, Path(synthetic_dir) / name)
    if task in TINY_VLM_TASKS:
        from mixkv.eval.tiny_vlm_tasks import make_tiny_vlm_suite

        return make_tiny_vlm_suite(task, limit or 5, seed, Path(synthetic_dir) / task)
    if task not in DATASET_TASKS:
        raise ValueError(f"Unknown multimodal task {task!r}; choose from: {', '.join(MM_TASKS)}.")
    if data is None:
        raise ValueError(f"Task {task!r} reads local files: pass its annotation file (--data {task}=FILE).")
    if task == "docvqa":
        return load_docvqa(data, images, limit=limit)
    if images is None:
        raise ValueError(f"Task {task!r} needs its image folder (--images {task}=DIR): {_IMAGES_HINT[task]}.")
    return _LOADERS[task](data, images, limit=limit)


# --------------------------------------------------------------------------------------------
# One example


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _has_chat_template(processor: Any) -> bool:
    return bool(getattr(processor, "chat_template", None)) or bool(
        getattr(_tokenizer(processor), "chat_template", None)
    )


def _visual_placeholder(processor: Any, kind: str) -> str:
    """The processor's ``image_token`` / ``video_token`` as a prompt placeholder (``kind``)."""
    token = getattr(processor, f"{kind}_token", None)
    if not isinstance(token, str) or not token:
        raise ValueError(
            f"{type(processor).__name__} has no chat template and no {kind}_token attribute; cannot "
            f"place the {kind} in the prompt. Give the processor a chat template."
        )
    vocab = _tokenizer(processor).get_vocab() if hasattr(_tokenizer(processor), "get_vocab") else {}
    if (
        token in ("<|image_pad|>", "<|video_pad|>")
        and "<|vision_start|>" in vocab
        and "<|vision_end|>" in vocab
    ):
        return f"<|vision_start|>{token}<|vision_end|>"  # Qwen-VL processors expect the wrapped pad
    return token


def build_mm_prompt(processor: Any, question: str, kind: str = "image") -> tuple[str, str]:
    """The prompt text for one image (or one video, ``kind="video"``) and a question, and how it
    was built.

    Returns
    -------
    (str, str)
        The prompt (with the processor's image or video placeholder, not yet expanded) and
        ``"chat_template"`` or ``"plain"`` (no chat template: ``<placeholder>\\n<question>``).
    """
    if _has_chat_template(processor):
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
        owner = processor if getattr(processor, "chat_template", None) else _tokenizer(processor)
        prompt = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return str(prompt), "chat_template"
    return f"{_visual_placeholder(processor, kind)}\n{question}", "plain"


def _placeholder_counts(model: Any, input_ids: torch.Tensor) -> tuple[int, int]:
    """(image, video) placeholder tokens of a prompt, by the model's placeholder ids."""
    from mixkv.integration.decoder_layout import placeholder_token_id

    counts = []
    for kind in ("image", "video"):
        token_id = placeholder_token_id(model.config, kind)
        counts.append(int((input_ids == token_id).sum()) if token_id is not None else 0)
    return counts[0], counts[1]


def _primary_score(scores: dict[str, float]) -> float:
    values = [v for k, v in scores.items() if k != "ocrbench_correct"]
    return sum(values) / len(values)


def run_mm_example(
    model: Any,
    processor: Any,
    example: MMExample,
    press: Any | None,
    *,
    max_new_tokens: int | None = None,
    coordinate_scale: str = "pixel",
    inputs: dict[str, Any] | None = None,
    prefix: SharedPrefix | None = None,
) -> dict[str, Any]:
    """Generate an answer for one example under ``press`` (None: full cache) and score it.

    With ``prefix`` (this example's :func:`prefill_image_prefix`, mixkv presses only) a copy of its
    cache is used: ``generate`` prefills only the prompt's tail (as ids, or as embeddings when it
    starts inside the image), under the press, which compresses prefix and tail together as it
    would a one-go prefill.

    Returns
    -------
    dict
        JSON-serialisable record: prompt, output, score, token counts (``image_tokens`` counted in
        the prompt, ``shared_prefix_tokens``: 0 for a one-go prefill), timings
        (``prefill_seconds``: the first forward pass, compression included, plus the shared
        prefix's own time; ``decode_seconds``: the rest of ``generate``), KV bytes right after prefill (``kv_bytes``)
        and without compression (``kv_bytes_full``), ``kv_fraction``, mean kept tokens per KV head,
        ``image_tokens_total`` / ``image_tokens_kept`` and the press's report.
    """
    prompt = example_prompt(processor, example)
    if inputs is None:
        inputs = encode_example(processor, example, prompt)
    ids = inputs["input_ids"]
    n_prompt = int(ids.shape[1])
    n_image, n_video = _placeholder_counts(model, ids[0])
    new_tokens = max_new_tokens or DEFAULT_NEW_TOKENS.get(example.metric, 24)
    tok = _tokenizer(processor)
    pad = getattr(tok, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tok, "eos_token_id", None)

    prefill: dict[str, Any] = {}

    def before(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if "start" not in prefill:
            prefill["start"] = time.perf_counter()

    def after(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if "bytes" not in prefill:
            prefill["seconds"] = time.perf_counter() - prefill["start"]
            cache = find_cache(output, kwargs)
            prefill["bytes"] = kv_cache_bytes(cache) if cache is not None else 0

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    generate_inputs = inputs
    cache = None
    if prefix is not None:
        if press is not None and not isinstance(press, BasePress):
            raise ValueError(
                f"{type(press).__name__} cannot continue from a shared prefix (only mixkv presses compress a "
                "cache that already holds one); pass prefix=None"
            )
        cache = copy.deepcopy(prefix.cache)
        restore_generation_state(model, prefix.generation_state)
        generate_inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            cache_argument(model): cache,
        }
        if prefix.embeddings is not None:
            generate_inputs["inputs_embeds"] = prefix.embeddings
    manager = press_applied(press, model)
    try:
        with torch.inference_mode(), manager as session:
            if session is not None and cache is not None:
                session.declare_prompt(cache, ids)
            start = time.perf_counter()
            out = model.generate(
                **generate_inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
            )
            total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    prefix_seconds = 0.0 if prefix is None else prefix.seconds
    generated = out[0, n_prompt:]
    text = str(tok.decode(generated, skip_special_tokens=True)).strip()
    report = getattr(press, "last_report", None) if press is not None else None
    kv_bytes = int(prefill.get("bytes", 0))
    record: dict[str, Any] = {
        "id": example.id,
        "image": str(example.image_path),
        "frames": len(example.frames),
        "question": example.question,
        "answers": list(example.answers),
        "metric": example.metric,
        "prompt": prompt,
        "output": text,
        "score": _primary_score(score_examples([example], [text], coordinate_scale=coordinate_scale)),
        "prompt_tokens": n_prompt,
        "image_tokens": n_image,
        "video_tokens": n_video,
        "new_tokens": int(generated.numel()),
        "shared_prefix_tokens": 0 if prefix is None else prefix.tokens,
        "compressed": report is not None,
        "prefill_seconds": float(prefill.get("seconds", 0.0)) + prefix_seconds,
        "decode_seconds": total - float(prefill.get("seconds", 0.0)),
        "kv_bytes": kv_bytes,
        "kv_bytes_full": kv_bytes,
        "kept_tokens_mean": float(n_prompt),
        "compression_seconds": 0.0,
        "image_tokens_total": n_image,
        "image_tokens_kept": float(n_image),
        "video_tokens_total": n_video,
        "video_tokens_kept": float(n_video),
        "report": None,
    }
    if report is not None:
        kept = report.kept_tokens
        record["kv_bytes"] = int(report.compressed_bytes)
        record["kv_bytes_full"] = int(report.full_bytes)
        record["kept_tokens_mean"] = float(kept.float().mean().item()) if kept.numel() else 0.0
        record["compression_seconds"] = float(report.compression_seconds)
        if report.image_tokens_total is not None:
            record["image_tokens_total"] = int(report.image_tokens_total[0])
        if report.image_tokens_kept is not None:
            record["image_tokens_kept"] = float(report.image_tokens_kept[0])
        if report.video_tokens_total is not None:
            record["video_tokens_total"] = int(report.video_tokens_total[0])
        if report.video_tokens_kept is not None:
            record["video_tokens_kept"] = float(report.video_tokens_kept[0])
        record["report"] = report.to_dict()
    record["kv_fraction"] = record["kv_bytes"] / record["kv_bytes_full"] if record["kv_bytes_full"] else 1.0
    return record


def example_prompt(processor: Any, example: MMExample) -> str:
    prompt = build_mm_prompt(processor, example.question, "video" if example.is_video else "image")[0]
    return prompt + example.answer_prefix


def _open_rgb(path: Path, example: MMExample) -> Any:
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"Image file {path} of example {example.id!r} not found.")
    with Image.open(path) as im:
        return im.convert("RGB")


def encode_example(processor: Any, example: MMExample, prompt: str) -> dict[str, Any]:
    if example.is_video:
        if getattr(processor, "video_processor", None) is None:
            raise ValueError(
                f"{type(processor).__name__} has no video processor, so video example {example.id!r} cannot "
                "be encoded (transformers' video processors need torchvision); evaluate image tasks only"
            )
        frames = [_open_rgb(frame, example) for frame in example.frames]
        batch = processor(text=[prompt], videos=[frames], return_tensors="pt")
    else:
        batch = processor(text=[prompt], images=[_open_rgb(example.image_path, example)], return_tensors="pt")
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


_PER_TOKEN_INPUTS = ("token_type_ids", "mm_token_type_ids")


class _DecoderReached(Exception):
    pass


def _decoder_inputs(model: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The prompt's input embeddings as the text decoder receives them, image features merged in;
    the forward stops there (only the vision side runs)."""
    captured: dict[str, torch.Tensor] = {}

    def stop(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        captured["embeddings"] = kwargs["inputs_embeds"]
        raise _DecoderReached

    handle = model.get_decoder().register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False)
    except _DecoderReached:
        pass
    finally:
        handle.remove()
    if "embeddings" not in captured:
        raise ValueError(f"{type(model).__name__} never called its text decoder with inputs_embeds")
    return captured["embeddings"]


def prefill_image_prefix(model: Any, inputs: Mapping[str, Any], tail_tokens: int) -> SharedPrefix | None:
    """Prefill all but the last ``tail_tokens`` tokens of an encoded one-example prompt with the
    full cache.

    Every press then copies this cache and prefills only the tail (see :func:`run_mm_example`); a
    press scores only the tail's last ``window_size`` queries, so with ``tail_tokens >=
    window_size`` this is the one-go computation up to the float rounding of a forward split in
    two. A tail that holds image tokens (a question shorter than the tail after the image) is fed
    as embeddings; that split is exact only where image tokens attend causally at 1-D positions,
    so models with M-RoPE (Qwen-VL) or bidirectional image attention (Gemma 3) share nothing
    then. None when nothing is shared: also for a batch, or a prompt not 2 tokens longer than the
    tail.
    """
    from transformers import DynamicCache

    ids = inputs["input_ids"]
    tokens = int(ids.shape[1]) - tail_tokens
    if ids.shape[0] != 1 or tokens < 2:
        return None
    inner: Any = getattr(model, "model", None)
    start = time.perf_counter()
    embeddings = None
    if sum(_placeholder_counts(model, ids[0, tokens:])) > 0:
        if hasattr(inner, "rope_deltas") or any(k in inputs for k in _PER_TOKEN_INPUTS):
            return None
        embeddings = _decoder_inputs(model, inputs)
    cache = DynamicCache(config=model.config)
    if getattr(inner, "rope_deltas", None) is not None:
        inner.rope_deltas = None  # computed afresh from this prompt's images
    with torch.inference_mode():
        if embeddings is None:
            # Per-token inputs (Qwen-VL's mm_token_type_ids, Gemma 3's token_type_ids) cover the prefix.
            extra = {
                k: v[:, :tokens] if k in _PER_TOKEN_INPUTS else v
                for k, v in inputs.items()
                if k not in ("input_ids", "attention_mask")
            }
            prefill(model, ids[:, :tokens], cache, **extra)
        else:
            model(inputs_embeds=embeddings[:, :tokens], use_cache=True, **{cache_argument(model): cache})
    seconds = time.perf_counter() - start
    return SharedPrefix(cache, tokens, seconds, embeddings, generation_state(model))


# --------------------------------------------------------------------------------------------
# The grid


def observation_window(window_size: int, budget: int | None) -> int:
    """The window a press uses at ``budget``: ``window_size``, or half the budget when that is smaller."""
    return window_size if budget is None else max(1, min(window_size, budget // 2))


def _fingerprint(examples: Sequence[MMExample]) -> str:
    h = hashlib.sha1()
    for ex in examples:
        size = ex.image_path.stat().st_size if ex.image_path.is_file() else -1
        frames = [(f.name, f.stat().st_size if f.is_file() else -1) for f in ex.frames]
        h.update(repr((ex.id, ex.question, list(ex.answers), ex.metric, ex.image_path.name, size)).encode())
        if frames:  # image examples keep their fingerprint (and finished cells) from before
            h.update(repr(frames).encode())
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
    report_only: bool = False,
) -> cell_store.EvalResult:
    """Run (or resume) methods x budgets over multimodal tasks; write cell JSON, results.md, a plot.

    Parameters
    ----------
    model_spec
        A local vision-language model directory (loaded with :func:`mixkv.model_loading.load_model`, only if
        some cell must be computed) or a loaded ``(model, processor)`` pair.
    tasks
        Task name -> its examples (see :func:`load_mm_task`).
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
        Generated tokens per example (default: :data:`DEFAULT_NEW_TOKENS` of its metric).
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
        :func:`prefill_image_prefix`); the press then compresses prefix and tail together, as in a
        one-go prefill. Up to the float rounding of the split forward this is the same computation,
        and the image is encoded and prefilled once per example instead of once per (method,
        budget). False prefills every cell from scratch; kvpress methods, and prompts whose last
        ``window_size`` tokens include an image token, always are.
    report_only
        Compute nothing and load no model: report the finished cells and the checkpoints of
        unfinished ones, as for :func:`mixkv.eval.runner.run_eval`.

    Returns
    -------
    mixkv.eval.cell_store.EvalResult

    Raises
    ------
    ValueError
        Unknown method, a ``compare`` pair not made of two of ``methods``, non-positive budgets,
        empty task, examples without reference answers, or a text-only model.
    FileNotFoundError
        An example's image file is missing (the message names it).
    """
    methods = runner.check_methods(methods)
    compare = runner.check_compare(compare, methods)
    budgets = sorted({int(b) for b in runner.as_list("budgets", budgets)})
    if any(b < 1 for b in budgets):
        raise ValueError(f"Budgets must be positive token counts, got {budgets}.")
    if not tasks:
        raise ValueError("tasks must not be empty.")
    for name, examples in tasks.items():
        if not examples:
            raise ValueError(f"Task {name!r} has no examples.")
        for ex in examples:
            for path in ex.frames or [ex.image_path]:
                if not path.is_file():
                    raise FileNotFoundError(
                        f"Image file {path} of example {ex.id!r} (task {name}) not found."
                    )
            if not ex.answers and ex.metric != "point_in_box":
                raise ValueError(
                    f"Task {name!r}: example {ex.id!r} has no reference answers (a test split?)."
                )
    if isinstance(model_spec, tuple):
        _check_vlm(model_spec[0], model_spec[1], cell_store.model_identity(model_spec))
    else:
        _precheck_model_dir(model_spec)
    task_names = list(tasks)
    head_table = None
    if head_scores is not None:
        from mixkv.presses.head_tables import resolve_head_table

        head_table = resolve_head_table(head_scores, "visual_head_scores")
    elif any("sparsemm" in m for m in methods):
        raise ValueError(
            "SparseMM methods need visual-head scores: measure them with `mixkv calibrate MODEL --prompts "
            "FILE --out FILE` and pass --head-scores FILE."
        )

    cells: list[cell_store.Cell] = []
    for task in task_names:
        for method in methods:
            if method == "full":
                cells.append(cell_store.Cell(method, None, task, None))
            else:
                cells.extend(cell_store.Cell(method, b, task, None) for b in budgets)

    out = Path(out_dir)
    cell_dir = out / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    model_id = cell_store.model_identity(model_spec)
    base_identity = {
        "kind": "multimodal",
        "model": model_id,
        "seed": seed,
        "protocol": "query_aware",
        "window_size": window_size,
        "max_new_tokens": max_new_tokens,
        "coordinate_scale": coordinate_scale,
    }
    head_digest = None if head_table is None else hashlib.sha1(head_table.numpy().tobytes()).hexdigest()
    task_identities = {
        t: {**base_identity, "task_examples": len(tasks[t]), "task_sha1": _fingerprint(tasks[t])}
        for t in task_names
    }

    def identity(cell: cell_store.Cell) -> dict[str, Any]:
        # Only SparseMM cells depend on the head scores: other cells stay reusable across runs with
        # and without --head-scores.
        if head_digest is None or "sparsemm" not in cell.method:
            return task_identities[cell.task]
        return {**task_identities[cell.task], "head_scores_sha1": head_digest}

    run_config = {
        **base_identity,
        "methods": methods,
        "budgets": budgets,
        "tasks": task_names,
        "n": {t: len(tasks[t]) for t in task_names},
        "sources": json.loads(json.dumps(dict(sources or {}), default=str)),
        "share_prefill": share_prefill,
    }
    result = cell_store.EvalResult()

    def expected(cell: cell_store.Cell) -> tuple[dict[str, Any], int]:
        return identity(cell), len(tasks[cell.task])

    def score_on(cell: cell_store.Cell, records: list[dict[str, Any]]) -> float:
        outputs = [r["output"] for r in records]
        examples = tasks[cell.task][: len(records)]
        return _primary_score(score_examples(examples, outputs, coordinate_scale=coordinate_scale))

    if report_only:
        todo: list[cell_store.Cell] = []
        finished = cell_store.cells_so_far(cells, cell_dir, expected, score_on)
    else:
        todo, finished = cell_store.plan_cells(cells, cell_dir, expected, resume, result)

    if todo:
        if isinstance(model_spec, tuple):
            model, processor = model_spec
        else:
            from mixkv.model_loading import load_model

            model, processor = load_model(model_spec)
            _check_vlm(model, processor, model_spec)
        versions, machine = cell_store.software_versions(), cell_store.machine_info()
        prompt_format = build_mm_prompt(processor, "?")[1]
        # Example-major order within each task: an example is encoded and its shared prefix
        # prefilled once for every pending cell; the cells are written when the task ends.
        groups: dict[str, list[cell_store.Cell]] = {}
        for cell in todo:
            groups.setdefault(cell.task, []).append(cell)
        with runner.progress(sum(len(tasks[c.task]) for c in todo)) as bar:
            for task, group in groups.items():
                bar.set_description(task)
                examples = list(tasks[task])
                digests = [_fingerprint([example]) for example in examples]
                records: dict[cell_store.Cell, list[dict[str, Any]]] = {}
                seconds: dict[cell_store.Cell, float] = {}
                for cell in group:
                    records[cell], seconds[cell] = (
                        cell_store.load_partial(cell_dir, cell, identity(cell), digests)
                        if resume
                        else ([], 0.0)
                    )
                    bar.update(len(records[cell]))
                for i, example in enumerate(examples):
                    pending = [cell for cell in group if len(records[cell]) == i]
                    if not pending:
                        continue
                    inputs = encode_example(processor, example, example_prompt(processor, example))
                    prefix = None
                    if share_prefill and any(c.method not in runner.KVPRESS_METHODS for c in pending):
                        prefix = prefill_image_prefix(model, inputs, tail_tokens=window_size)
                    for cell in pending:
                        start = time.perf_counter()
                        torch.manual_seed(seed)  # per example, so a resumed cell draws what a whole run draws
                        press = build_press(
                            cell.method,
                            cell.budget,
                            context_tokens=int(inputs["input_ids"].shape[1]),
                            window_size=observation_window(window_size, cell.budget),
                            head_scores=head_table,
                        )
                        record = run_mm_example(
                            model,
                            processor,
                            example,
                            press,
                            max_new_tokens=max_new_tokens,
                            coordinate_scale=coordinate_scale,
                            inputs=inputs,
                            prefix=None if cell.method in runner.KVPRESS_METHODS else prefix,
                        )
                        records[cell].append({**record, "example_sha1": digests[i]})
                        seconds[cell] += time.perf_counter() - start
                        bar.update(1)
                    for cell in pending:  # an interrupted run resumes after the last finished example
                        cell_store.save_partial(cell_dir, cell, identity(cell), records[cell], seconds[cell])
                for cell in group:
                    outputs = [r["output"] for r in records[cell]]
                    scores = score_examples(examples, outputs, coordinate_scale=coordinate_scale)
                    finished[cell] = cell_store.write_cell(
                        cell_dir,
                        cell,
                        identity=identity(cell),
                        config={**run_config, "prompt_format": prompt_format},
                        records=records[cell],
                        score=_primary_score(scores),
                        wall_seconds=seconds[cell],
                        seed=seed,
                        versions=versions,
                        machine=machine,
                        extra={"scores": scores, **_visual_token_means(records[cell])},
                    )
                    cell_store.partial_path(cell_dir, cell).unlink(missing_ok=True)
                    result.computed.append(cell.name)

    reporting.write_summary(
        result,
        cells,
        finished,
        out,
        methods=methods,
        budgets=budgets,
        tasks=task_names,
        context_lengths=[None],
        compare=compare,
    )
    return result
