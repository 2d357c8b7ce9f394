"""A multimodal evaluation example and the scoring of model outputs with each example's metric.

An :class:`MMExample` comes from a benchmark's files (:mod:`mixkv.eval.mm_datasets`), a seeded
synthetic suite (:mod:`mixkv.eval.synthetic_images`) or the tiny VLM's task families
(:mod:`mixkv.eval.tiny_vlm_tasks`); :func:`score_examples` scores outputs with the metrics of
:mod:`mixkv.eval.mm_metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixkv.eval import mm_metrics

__all__ = ["MMExample", "save_png", "score_examples"]


@dataclass
class MMExample:
    """One multimodal evaluation example.

    Attributes
    ----------
    id : str
        Identifier, unique within its dataset.
    image_path : Path
        Image file the question is about (the first one when there are several); for a video
        example, the folder of its frames.
    question : str
        Text prompt for the model.
    answers : list of str
        Reference answers (empty when the split has no public answers). For ``point_in_box``
        examples it holds the target box as text ``"[x1, y1, x2, y2]"``; the numbers are in
        ``extra["bbox"]``. For ``numbers_recall`` examples it holds every number asked for, in
        order (each is scored, they are not alternatives).
    metric : str
        Name of the metric in :data:`mixkv.eval.mm_metrics.METRIC_NAMES`.
    extra : dict
        Dataset-specific fields (category, bbox, image size, ...).
    frames : list of Path
        Frame files, in order, of a video example (empty for an image example).
    answer_prefix : str
        Text the assistant's turn starts with, appended to the prompt after the generation prompt
        (empty for the benchmarks; the tiny VLM's tasks start the answer with the row's key).
    more_images : list of Path
        Further image files after ``image_path``, shown in order in the same user turn (empty for
        a one-image example).
    """

    id: str
    image_path: Path
    question: str
    answers: list[str]
    metric: str
    extra: dict[str, Any] = field(default_factory=dict)
    frames: list[Path] = field(default_factory=list)
    answer_prefix: str = ""
    more_images: list[Path] = field(default_factory=list)

    @property
    def is_video(self) -> bool:
        """Whether the example shows a clip of frames rather than one image."""
        return bool(self.frames)

    @property
    def image_paths(self) -> list[Path]:
        """Every image file of an image example, in prompt order (``image_path`` first)."""
        return [self.image_path, *self.more_images]

    def __post_init__(self) -> None:
        if self.frames and self.more_images:
            raise ValueError(
                f"MMExample {self.id!r}: a video example cannot also have more_images; "
                "give either frames or images."
            )
        if self.metric not in mm_metrics.METRIC_NAMES:
            raise ValueError(
                f"MMExample {self.id!r}: unknown metric {self.metric!r}; "
                f"use one of {mm_metrics.METRIC_NAMES}."
            )


def _image_size(example: MMExample) -> tuple[int, int] | None:
    """``extra["image_size"]`` or, failing that, the size read from the image file."""
    size = example.extra.get("image_size")
    if size is not None:
        return int(size[0]), int(size[1])
    if not example.image_path.is_file():
        return None
    from PIL import Image

    with Image.open(example.image_path) as im:
        return im.size


def score_examples(
    examples: Sequence[MMExample], predictions: Sequence[str], coordinate_scale: str = "pixel"
) -> dict[str, float]:
    """Score predictions with the metric of each example, aggregated per metric.

    Parameters
    ----------
    examples : sequence of MMExample
        Examples, possibly mixing metrics.
    predictions : sequence of str
        One model output per example.
    coordinate_scale : {"pixel", "normalized_1", "normalized_1000"}, default "pixel"
        Coordinate convention of the outputs of ``point_in_box`` examples; normalised scales
        need the image size (``extra["image_size"]`` or read from the image file).

    Returns
    -------
    dict of str to float
        Aggregate per metric name present: the mean score, in ``[0, 1]`` except ``cider_d``
        (toolkit scale). ``ocrbench`` is the accuracy; ``ocrbench_correct`` the count.

    Raises
    ------
    ValueError
        If lengths differ or an example has no reference answers.
    """
    if len(examples) != len(predictions):
        raise ValueError(
            f"score_examples: got {len(predictions)} predictions for {len(examples)} examples; "
            "pass one prediction per example."
        )
    groups: dict[str, list[tuple[MMExample, str]]] = {}
    for ex, pred in zip(examples, predictions, strict=True):
        if not ex.answers and ex.metric != "point_in_box":
            raise ValueError(f"score_examples: example {ex.id!r} has no reference answers (a test split?).")
        groups.setdefault(ex.metric, []).append((ex, pred))
    result: dict[str, float] = {}
    for metric, items in groups.items():
        exs = [e for e, _ in items]
        preds = [p for _, p in items]
        answers = [e.answers for e in exs]
        if metric == "anls":
            result[metric] = mm_metrics.mean_anls(preds, answers)
        elif metric == "vqa_accuracy":
            result[metric] = mm_metrics.mean_vqa_accuracy(preds, answers)
        elif metric == "relaxed_accuracy":
            result[metric] = mm_metrics.mean_relaxed_accuracy(preds, answers)
        elif metric == "ocrbench":
            cats = [str(e.extra.get("dataset_name") or e.extra.get("type", "")) for e in exs]
            ocr = mm_metrics.ocrbench_score(preds, answers, cats)
            result["ocrbench"] = ocr.accuracy
            result["ocrbench_correct"] = float(ocr.correct)
        elif metric == "cider_d":
            result[metric] = mm_metrics.cider_d(preds, answers)
        elif metric == "multiple_choice":
            result[metric] = mm_metrics.mean_multiple_choice_accuracy(preds, answers)
        elif metric == "exact_match":
            result[metric] = sum(
                mm_metrics.exact_match(p, a) for p, a in zip(preds, answers, strict=True)
            ) / len(preds)
        elif metric == "numbers_recall":
            result[metric] = sum(
                mm_metrics.numbers_recall(p, a) for p, a in zip(preds, answers, strict=True)
            ) / len(preds)
        elif metric == "mark_in_box":
            result[metric] = sum(
                mm_metrics.mark_in_box(p, e.extra["marks"], e.extra["bbox"])
                for e, p in zip(exs, preds, strict=True)
            ) / len(preds)
        else:  # point_in_box
            bboxes = []
            for e in exs:
                if "bbox" not in e.extra:
                    raise ValueError(f"score_examples: point_in_box example {e.id!r} has no extra['bbox'].")
                bboxes.append(e.extra["bbox"])
            sizes = None
            if coordinate_scale != "pixel":
                sizes = []
                for e in exs:
                    size = _image_size(e)
                    if size is None:
                        raise ValueError(
                            f"score_examples: example {e.id!r} needs extra['image_size'] or an existing "
                            f"image file for coordinate_scale={coordinate_scale!r}."
                        )
                    sizes.append(size)
            result[metric] = mm_metrics.screenspot_accuracy(preds, bboxes, sizes, coordinate_scale)
    return result


def save_png(image: Any, path: Path) -> None:
    """Write ``image`` (a PIL image) to ``path`` as a PNG, atomically: every process of a
    data-parallel run renders the same synthetic examples, and none may read a file another one is
    still writing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
