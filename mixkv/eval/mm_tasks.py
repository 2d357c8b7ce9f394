"""Multimodal task names and where their examples come from.

A multimodal *task* is a named list of :class:`~mixkv.eval.mm_example.MMExample`: a benchmark read
from local files by :mod:`mixkv.eval.mm_datasets`, a seeded synthetic suite from
:mod:`mixkv.eval.synthetic_images`, or the tiny VLM's held-out families
(:mod:`mixkv.eval.tiny_vlm_tasks`). :func:`load_mm_task` resolves a name to its examples.
"""

from __future__ import annotations

from pathlib import Path

from mixkv.eval.mm_datasets import (
    MMExample,
    load_chartqa,
    load_docvqa,
    load_ocrbench,
    load_screenspot,
    load_textcaps,
    load_textvqa,
    load_videomme,
)

__all__ = ["DATASET_TASKS", "MM_TASKS", "SYNTHETIC_TASK_NAMES", "TINY_VLM_TASKS", "load_mm_task"]

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
#: The tiny VLM's tasks (:mod:`mixkv.eval.tiny_vlm_tasks`), held-out test images rendered on the fly:
#: one region of one image, then the coverage tasks (several images, several regions).
TINY_VLM_TASKS: tuple[str, ...] = (
    "board_codes",
    "chart_values",
    "gui_marks",
    "boards4_codes",
    "board_two_codes",
    "chart_two_values",
    "gui_ids",
)
#: Every multimodal task name.
MM_TASKS: tuple[str, ...] = DATASET_TASKS + SYNTHETIC_TASK_NAMES + TINY_VLM_TASKS

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
