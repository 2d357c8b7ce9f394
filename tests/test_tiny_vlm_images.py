"""The tiny VLM's character-cell images, their labels, evaluation tasks and metrics."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mixkv.eval.mm_example import score_examples
from mixkv.eval.mm_metrics import exact_match, mark_in_box
from mixkv.eval.tiny_vlm_tasks import make_tiny_vlm_suite
from mixkv.tiny_vlm.images import CELL, CHARSET, FAMILIES, GRID, IMAGE_SIZE, render


@pytest.mark.parametrize("family", FAMILIES)
def test_every_cell_has_one_label_from_the_charset_and_rows_end_with_a_newline(family):
    for index in range(20):
        example = render(family, 0, index)
        assert example.image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert len(example.labels) == GRID * GRID
        assert set(example.labels) <= set(CHARSET)
        assert example.labels[GRID - 1 :: GRID] == ["\n"] * GRID


@pytest.mark.parametrize("family", FAMILIES)
def test_the_same_arguments_render_the_same_image(family):
    a, b = render(family, 3, 7), render(family, 3, 7)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.labels == b.labels


@pytest.mark.parametrize("family", FAMILIES)
def test_train_and_test_splits_draw_different_images(family):
    train = {render(family, 0, i, "train").image.tobytes() for i in range(10)}
    test = {render(family, 0, i, "test").image.tobytes() for i in range(10)}
    assert not train & test


@pytest.mark.parametrize("family", ["board", "chart"])
def test_the_answer_follows_its_prefix_in_the_cell_text(family):
    for index in range(20):
        example = render(family, 0, index)
        key = re.escape(example.answer_prefix.removesuffix(":"))
        # the board writes "Ada Moss: 482913"; the chart "Plums" then its (blank-labelled) bar, then the value
        assert re.search(rf"{key}:? +{example.answer}\b", example.text)


def test_a_gui_mark_follows_its_button_label_and_stands_for_the_target_box():
    for index in range(20):
        example = render("gui", 0, index)
        assert f"{example.answer_prefix}{example.answer}" in example.text
        assert example.extra["marks"][example.answer] == example.extra["bbox"]


@pytest.mark.parametrize("family", FAMILIES)
def test_cells_labelled_blank_hold_no_dark_glyph_and_written_cells_do(family):
    # The labels must describe the picture: a character cell has ink that differs from the cell's
    # own background, a blank cell is (nearly) uniform unless a bar or frame crosses it.
    example = render(family, 0, 1)
    pixels = np.asarray(example.image.convert("L"), dtype=np.float32)
    for i, label in enumerate(example.labels):
        row, col = divmod(i, GRID)
        cell = pixels[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]
        if label.strip():
            assert cell.max() - cell.min() > 60, (row, col, label)
        if label == "\n":
            assert cell.max() - cell.min() < 60, (row, col)


def test_unknown_family_or_split_is_refused_by_name():
    with pytest.raises(ValueError, match="board, chart, gui"):
        render("receipt", 0, 0)
    with pytest.raises(ValueError, match="train, validation, test"):
        render("board", 0, 0, "dev")


def test_suite_examples_carry_the_prefix_answer_and_a_png(tmp_path):
    examples = make_tiny_vlm_suite("gui_marks", 3, 0, tmp_path)
    assert [e.id for e in examples] == ["gui_marks_0_0", "gui_marks_0_1", "gui_marks_0_2"]
    for e in examples:
        assert e.image_path.is_file() and e.metric == "mark_in_box"
        assert e.answer_prefix.endswith(":") and e.answers[0].isdigit()
    assert make_tiny_vlm_suite("board_codes", 2, 0, tmp_path)[1].metric == "exact_match"


def test_exact_match_takes_the_first_word_without_punctuation():
    assert exact_match(" 482913.", ["482913"]) == 1.0
    assert exact_match("482918", ["482913"]) == 0.0
    assert exact_match("", ["482913"]) == 0.0


def test_mark_in_box_scores_the_centre_of_the_answered_mark():
    marks = {"3": [0, 0, 10, 10], "5": [20, 0, 30, 10]}
    assert mark_in_box(" 3", marks, [0, 0, 10, 10]) == 1.0
    assert mark_in_box("5", marks, [0, 0, 10, 10]) == 0.0
    assert mark_in_box("7", marks, [0, 0, 10, 10]) == 0.0
    assert mark_in_box("none", marks, [0, 0, 10, 10]) == 0.0


def test_score_examples_uses_the_new_metrics(tmp_path):
    examples = make_tiny_vlm_suite("gui_marks", 2, 0, tmp_path) + make_tiny_vlm_suite(
        "board_codes", 2, 0, tmp_path
    )
    predictions = [examples[0].answers[0], "0", examples[2].answers[0], "x"]
    assert score_examples(examples, predictions) == {"mark_in_box": 0.5, "exact_match": 0.5}


def test_calibration_prompts_come_from_the_validation_split(tmp_path):
    import json

    from mixkv.eval.tiny_vlm_tasks import write_calibration_prompts
    from mixkv.integration.calibration import read_prompts

    path = write_calibration_prompts(tmp_path, 2)
    prompts = read_prompts(path)
    assert len(prompts) == 6
    first = json.loads(path.read_text().splitlines()[0])
    assert (tmp_path / first["images"][0]).is_file()
    test_images = {
        e.image_path.read_bytes() for e in make_tiny_vlm_suite("board_codes", 2, 0, tmp_path / "t")
    }
    assert (tmp_path / first["images"][0]).read_bytes() not in test_images


def test_the_keep_map_puts_each_image_tokens_fraction_on_its_cell():
    from mixkv.demos.image_demo import image_keep_map
    from mixkv.presses.compression_report import CompressionReport

    image_token = 7
    ids = torch.tensor([[1, 2] + [image_token] * (GRID * GRID) + [3, 4]])
    fraction = torch.zeros(1, ids.shape[1])
    fraction[0, 2 : 2 + GRID * GRID] = torch.linspace(0, 1, GRID * GRID)
    report = CompressionReport([ids.shape[1]], [64], torch.zeros(1, 1, 1), position_keep_fraction=fraction)
    keep = image_keep_map(report, ids, image_token)
    assert keep.shape == (GRID, GRID)
    assert keep[0, 0] == 0 and keep[-1, -1] == 1 and keep[1, 0] == fraction[0, 2 + GRID]
    with pytest.raises(ValueError, match="expected 400 image tokens"):
        image_keep_map(report, ids[:, :-3].clone().fill_(image_token)[:, :10], image_token)
