"""The tiny VLM's task families as multimodal evaluation tasks (``mixkv eval --tasks board_codes,...``).

``board_codes``, ``chart_values`` and ``gui_marks`` are the ``test`` split of the ``board``, ``chart``
and ``gui`` families of :mod:`mixkv.tiny_vlm.images`: freshly generated, never trained on. Each image
is written as a PNG (byte-identical for the same seed and index) and becomes an
:class:`~mixkv.eval.mm_example.MMExample` with the family's answer prefix. Metrics:
``exact_match`` for codes and values (they are read, not estimated), ``mark_in_box`` for the GUI
(the answered mark's button centre must lie in the target button).
"""

from __future__ import annotations

from pathlib import Path

from mixkv.eval.mm_example import MMExample, save_png
from mixkv.tiny_vlm.images import render

__all__ = ["TASK_FAMILIES", "make_tiny_vlm_suite", "write_calibration_prompts"]

TASK_FAMILIES: dict[str, str] = {"board_codes": "board", "chart_values": "chart", "gui_marks": "gui"}
"""Evaluation task name -> image family."""


def make_tiny_vlm_suite(task: str, n: int, seed: int, out_dir: str | Path) -> list[MMExample]:
    """Render the first ``n`` test examples of ``task`` for ``seed`` into ``out_dir``.

    Raises
    ------
    ValueError
        Unknown task or ``n < 1``.
    """
    if task not in TASK_FAMILIES:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASK_FAMILIES)}.")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    family = TASK_FAMILIES[task]
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for index in range(n):
        cell_image = render(family, seed, index, "test")
        path = folder / f"{task}_{seed}_{index}.png"
        if not path.is_file():
            save_png(cell_image.image, path)
        metric = "mark_in_box" if family == "gui" else "exact_match"
        extra = {"task": task, "seed": seed, "index": index, "cell_text": cell_image.text, **cell_image.extra}
        examples.append(
            MMExample(
                id=f"{task}_{seed}_{index}",
                image_path=path,
                question=cell_image.question,
                answers=[cell_image.answer],
                metric=metric,
                extra=extra,
                answer_prefix=cell_image.answer_prefix,
            )
        )
    return examples


def write_calibration_prompts(out_dir: str | Path, n_per_family: int, seed: int = 0) -> Path:
    """Write ``prompts.jsonl`` for ``mixkv calibrate`` from the *validation* split (never the test images).

    Each line is ``{"text": question, "images": [png]}``; the PNGs are written next to it.

    Returns
    -------
    pathlib.Path
        The prompts file.
    """
    import json

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for task, family in TASK_FAMILIES.items():
        for index in range(n_per_family):
            cell_image = render(family, seed, index, "validation")
            name = f"{task}_validation_{seed}_{index}.png"
            cell_image.image.save(folder / name, format="PNG")
            lines.append(json.dumps({"text": cell_image.question, "images": [name]}))
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
