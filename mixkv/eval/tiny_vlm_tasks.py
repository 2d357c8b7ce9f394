"""The tiny VLM's task families as multimodal evaluation tasks (``mixkv eval --tasks board_codes,...``).

``board_codes``, ``chart_values`` and ``gui_marks`` are the ``test`` split of the ``board``, ``chart``
and ``gui`` families of :mod:`mixkv.tiny_vlm.images`: freshly generated, never trained on. Each image
is written as a PNG (byte-identical for the same seed and index) and becomes an
:class:`~mixkv.eval.mm_example.MMExample` with the family's answer prefix. Metrics:
``exact_match`` for codes and values (they are read, not estimated), ``mark_in_box`` for the GUI
(the answered mark's button centre must lie in the target button).

The *coverage tasks* (:data:`COVERAGE_TASKS`) ask what one region cannot answer, on the same
renderers (so the shipped encoder reads them):

* ``boards4_codes`` -- four boards in one prompt (1,600 image tokens), 4-5 lines each, no first
  name or surname repeated across the four; the code next to one name on one of them.
* ``board_two_codes``, ``chart_two_values`` -- the ``index``-th test image of the family (the same
  image as ``board_codes`` etc.), asked for two rows at once: "What are the codes next to A and
  B?". The answer starts with ``"A:"``; ``numbers_recall`` scores the fraction of the two numbers
  it gives in place (first integer for A, second for B).
  The model writes the second row's key itself before its number, so the second number is
  generated well after compression, with no question token next to it in the window.
* ``gui_ids`` -- a ``gui`` window whose buttons carry 3-digit ids after their labels
  (:func:`~mixkv.tiny_vlm.images.render_gui_ids`); "What is the number next to the Save button?"
  (``exact_match``). On ``gui_marks`` every press keeps the one-digit answer even at budget 32
  (the question's tokens in the observation window carry it); three digits need the image entries
  that hold them.

The questions' targets are drawn from a generator seeded with ``("test", task, seed, index)``.
"""

from __future__ import annotations

import random
from pathlib import Path

from mixkv.eval.mm_example import MMExample, save_png
from mixkv.tiny_vlm.images import CellImage, distinct_names, render, render_board, render_gui_ids

__all__ = [
    "COVERAGE_TASKS",
    "TASK_FAMILIES",
    "TINY_VLM_TASK_NAMES",
    "make_tiny_vlm_suite",
    "write_calibration_prompts",
]

TASK_FAMILIES: dict[str, str] = {"board_codes": "board", "chart_values": "chart", "gui_marks": "gui"}
"""Evaluation task name -> image family, for the one-image, one-region tasks."""

COVERAGE_TASKS: dict[str, str] = {
    "boards4_codes": "board",
    "board_two_codes": "board",
    "chart_two_values": "chart",
    "gui_ids": "gui",
}
"""Tasks whose answer needs several images or several regions -> the image family they draw."""

TINY_VLM_TASK_NAMES: tuple[str, ...] = (*TASK_FAMILIES, *COVERAGE_TASKS)
"""Every tiny-VLM evaluation task."""

BOARDS_PER_PROMPT = 4
"""Boards shown in one ``boards4_codes`` prompt."""

_TWO_QUESTIONS = {
    "board_two_codes": ("names", "codes", "What are the codes next to {} and {}?"),
    "chart_two_values": ("categories", "values", "What are the values of {} and {}?"),
}


def make_tiny_vlm_suite(task: str, n: int, seed: int, out_dir: str | Path) -> list[MMExample]:
    """Render the first ``n`` test examples of ``task`` for ``seed`` into ``out_dir``.

    Raises
    ------
    ValueError
        Unknown task or ``n < 1``.
    """
    if task not in TINY_VLM_TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TINY_VLM_TASK_NAMES)}.")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if task == "boards4_codes":
        return [_boards_example(seed, index, folder) for index in range(n)]
    if task == "gui_ids":
        return [_gui_ids_example(seed, index, folder) for index in range(n)]
    if task in COVERAGE_TASKS:
        return [_two_rows_example(task, seed, index, folder) for index in range(n)]
    family = TASK_FAMILIES[task]
    examples = []
    for index in range(n):
        cell_image = render(family, seed, index, "test")
        path = _save(cell_image, folder / f"{task}_{seed}_{index}.png")
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


def _save(cell_image: CellImage, path: Path) -> Path:
    if not path.is_file():
        save_png(cell_image.image, path)
    return path


def _question_rng(task: str, seed: int, index: int) -> random.Random:
    return random.Random(f"test/{task}/{seed}/{index}")


def _boards_example(seed: int, index: int, folder: Path) -> MMExample:
    """Four boards whose 16-20 names share no first name and no surname; the code of one name."""
    task = "boards4_codes"
    rng = _question_rng(task, seed, index)
    lines = [rng.randint(4, 5) for _ in range(BOARDS_PER_PROMPT)]
    names = distinct_names(rng, sum(lines))
    boards = []
    for k, count in enumerate(lines):
        start = sum(lines[:k])
        boards.append(render_board(f"test/{task}/{seed}/{index}/{k}", names[start : start + count]))
    target_board = rng.randrange(BOARDS_PER_PROMPT)
    board = boards[target_board]
    row = rng.randrange(len(board.extra["names"]))
    name, code = board.extra["names"][row], board.extra["codes"][row]
    paths = [_save(b, folder / f"{task}_{seed}_{index}_{k}.png") for k, b in enumerate(boards)]
    extra = {
        "task": task,
        "seed": seed,
        "index": index,
        "cell_text": [b.text for b in boards],
        "target": name,
        "target_board": target_board,
        "names": [b.extra["names"] for b in boards],
        "codes": [b.extra["codes"] for b in boards],
    }
    return MMExample(
        id=f"{task}_{seed}_{index}",
        image_path=paths[0],
        question=f"What is the code next to {name}?",
        answers=[code],
        metric="exact_match",
        extra=extra,
        answer_prefix=f"{name}:",
        more_images=paths[1:],
    )


def _gui_ids_example(seed: int, index: int, folder: Path) -> MMExample:
    """A window whose buttons carry 3-digit ids; the id next to one button."""
    task = "gui_ids"
    cell_image = render_gui_ids(f"test/{task}/{seed}/{index}")
    path = _save(cell_image, folder / f"{task}_{seed}_{index}.png")
    extra = {"task": task, "seed": seed, "index": index, "cell_text": cell_image.text, **cell_image.extra}
    return MMExample(
        id=f"{task}_{seed}_{index}",
        image_path=path,
        question=cell_image.question,
        answers=[cell_image.answer],
        metric="exact_match",
        extra=extra,
        answer_prefix=cell_image.answer_prefix,
    )


def _two_rows_example(task: str, seed: int, index: int, folder: Path) -> MMExample:
    """The family's ``index``-th test image, asked for two of its rows' numbers in one answer."""
    keys_field, numbers_field, template = _TWO_QUESTIONS[task]
    cell_image = render(COVERAGE_TASKS[task], seed, index, "test")
    keys = cell_image.extra[keys_field]
    numbers = cell_image.extra[numbers_field]
    number_of = numbers if isinstance(numbers, dict) else dict(zip(keys, numbers, strict=True))
    asked = _question_rng(task, seed, index).sample(keys, 2)
    answers = [str(number_of[key]) for key in asked]
    path = _save(cell_image, folder / f"{task}_{seed}_{index}.png")
    extra = {"task": task, "seed": seed, "index": index, "cell_text": cell_image.text, **cell_image.extra}
    extra["target"] = asked
    return MMExample(
        id=f"{task}_{seed}_{index}",
        image_path=path,
        question=template.format(*asked),
        answers=answers,
        metric="numbers_recall",
        extra=extra,
        answer_prefix=f"{asked[0]}:",
    )


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
