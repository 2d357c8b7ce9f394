"""Tests of mixkv.eval.synthetic_images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mixkv.eval.mm_metrics import relaxed_accuracy, screenspot_correct
from mixkv.eval.synthetic_images import SYNTHETIC_TASKS, TEXT_READING_QUESTION, make_synthetic_suite


def _pixels(path: Path, box: list[int] | list[float] | None = None) -> np.ndarray:
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        if box is not None:
            rgb = rgb.crop(tuple(int(v) for v in box))
        return np.asarray(rgb, dtype=np.int16)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_same_seed_gives_identical_files(task: str, tmp_path: Path) -> None:
    a = make_synthetic_suite(task, 3, seed=7, out_dir=tmp_path / "a")
    b = make_synthetic_suite(task, 3, seed=7, out_dir=tmp_path / "b")
    assert [e.image_path.read_bytes() for e in a] == [e.image_path.read_bytes() for e in b]
    assert [(e.question, e.answers, e.extra) for e in a] == [(e.question, e.answers, e.extra) for e in b]


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_different_seeds_give_different_images(task: str, tmp_path: Path) -> None:
    (a,) = make_synthetic_suite(task, 1, seed=1, out_dir=tmp_path)
    (b,) = make_synthetic_suite(task, 1, seed=2, out_dir=tmp_path)
    assert a.image_path.read_bytes() != b.image_path.read_bytes()


def test_smaller_suite_is_prefix_of_larger(tmp_path: Path) -> None:
    small = make_synthetic_suite("bar_chart", 2, seed=3, out_dir=tmp_path / "s")
    large = make_synthetic_suite("bar_chart", 4, seed=3, out_dir=tmp_path / "l")
    assert [e.answers for e in small] == [e.answers for e in large[:2]]


def test_unknown_task_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="text_reading, bar_chart, gui_grounding"):
        make_synthetic_suite("maze", 1, seed=0, out_dir=tmp_path)


def test_non_positive_n_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        make_synthetic_suite("text_reading", 0, seed=0, out_dir=tmp_path)


def test_too_small_image_size_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_suite("text_reading", 1, seed=0, out_dir=tmp_path, image_size=(64, 64))


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_images_have_requested_size(task: str, tmp_path: Path) -> None:
    (ex,) = make_synthetic_suite(task, 1, seed=0, out_dir=tmp_path, image_size=(320, 200))
    with Image.open(ex.image_path) as im:
        assert im.size == (320, 200)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_minimum_image_size_renders(task: str, tmp_path: Path) -> None:
    examples = make_synthetic_suite(task, 3, seed=5, out_dir=tmp_path, image_size=(128, 128))
    assert all(e.image_path.is_file() for e in examples)


def test_text_reading_example_fields(tmp_path: Path) -> None:
    (ex,) = make_synthetic_suite("text_reading", 1, seed=0, out_dir=tmp_path)
    assert ex.question == TEXT_READING_QUESTION
    assert ex.metric == "anls"
    (code,) = ex.answers
    assert 5 <= len(code) <= 7
    assert code.isalnum() and code.isupper()


def test_text_reading_code_is_drawn(tmp_path: Path) -> None:
    for ex in make_synthetic_suite("text_reading", 5, seed=11, out_dir=tmp_path):
        region = _pixels(ex.image_path, ex.extra["code_bbox"])
        background = np.array(ex.extra["background_color"], dtype=np.int16)
        ink = np.abs(region - background).sum(axis=-1) > 150
        # glyphs of a 5-7 character code cover a sizeable part of their bounding box
        assert ink.mean() > 0.1


def test_bar_chart_example_fields(tmp_path: Path) -> None:
    (ex,) = make_synthetic_suite("bar_chart", 1, seed=0, out_dir=tmp_path)
    target = ex.extra["target_category"]
    assert ex.question == f"What is the value of {target}?"
    assert ex.metric == "relaxed_accuracy"
    value = ex.extra["values"][ex.extra["categories"].index(target)]
    assert relaxed_accuracy(str(value), ex.answers) == 1.0


def test_bar_chart_target_bar_is_drawn(tmp_path: Path) -> None:
    for ex in make_synthetic_suite("bar_chart", 5, seed=11, out_dir=tmp_path):
        x1, y1, x2, y2 = ex.extra["bar_bbox"]
        region = _pixels(ex.image_path, [x1 + 1, y1 + 1, x2 - 1, y2 - 1])
        assert (region == np.array(ex.extra["bar_color"])).all()


def test_gui_example_fields(tmp_path: Path) -> None:
    (ex,) = make_synthetic_suite("gui_grounding", 1, seed=0, out_dir=tmp_path)
    assert ex.metric == "point_in_box"
    assert ex.question.startswith("Click on the ") and ex.question.endswith(" button.")
    label = ex.question[len("Click on the ") : -len(" button.")]
    assert label in ex.extra["buttons"]
    x1, y1, x2, y2 = ex.extra["bbox"]
    assert ex.answers == [f"[{int(x1)}, {int(y1)}, {int(x2)}, {int(y2)}]"]
    assert ex.extra["image_size"] == [448, 448]


def test_gui_target_button_is_drawn(tmp_path: Path) -> None:
    for ex in make_synthetic_suite("gui_grounding", 5, seed=11, out_dir=tmp_path):
        region = _pixels(ex.image_path, ex.extra["bbox"])
        background = np.array(ex.extra["background_color"], dtype=np.int16)
        differs = np.abs(region - background).sum(axis=-1) > 20
        assert differs.mean() > 0.9  # button fill covers the box


def test_gui_box_centre_scores_as_correct(tmp_path: Path) -> None:
    (ex,) = make_synthetic_suite("gui_grounding", 1, seed=2, out_dir=tmp_path)
    x1, y1, x2, y2 = ex.extra["bbox"]
    prediction = f"({(x1 + x2) / 2}, {(y1 + y2) / 2})"
    assert screenspot_correct(prediction, ex.extra["bbox"])
