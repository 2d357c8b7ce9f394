"""The tiny VLM's coverage tasks: several images in one prompt, answers that read several regions."""

from __future__ import annotations

import re

import pytest

from mixkv.eval.mm_example import MMExample, score_examples
from mixkv.eval.mm_metrics import numbers_recall
from mixkv.eval.mm_tasks import MM_TASKS, TINY_VLM_TASKS, load_mm_task
from mixkv.eval.tiny_vlm_tasks import (
    BOARDS_PER_PROMPT,
    COVERAGE_TASKS,
    TINY_VLM_TASK_NAMES,
    make_tiny_vlm_suite,
)
from mixkv.tiny_vlm.images import GRID, distinct_names, render, render_board, render_gui_ids

_TWO_ROW_TASKS = ("board_two_codes", "chart_two_values")


def _lines(cell_text: str) -> list[str]:
    """The image's rows as the language model reads them (the row-end column dropped)."""
    return [line.strip() for line in cell_text.split("\n") if line.strip()]


def test_every_tiny_vlm_task_is_registered_and_loads(tmp_path):
    assert TINY_VLM_TASKS == TINY_VLM_TASK_NAMES
    assert set(COVERAGE_TASKS) <= set(MM_TASKS)
    for task in COVERAGE_TASKS:
        examples = load_mm_task(task, limit=2, synthetic_dir=tmp_path)
        assert [e.id for e in examples] == [f"{task}_0_0", f"{task}_0_1"]


@pytest.mark.parametrize("task", sorted(COVERAGE_TASKS))
def test_the_same_seed_gives_the_same_examples_and_png_bytes(task, tmp_path):
    a = make_tiny_vlm_suite(task, 3, 0, tmp_path / "a")
    b = make_tiny_vlm_suite(task, 3, 0, tmp_path / "b")
    assert [(e.question, e.answers, e.answer_prefix) for e in a] == [
        (e.question, e.answers, e.answer_prefix) for e in b
    ]
    for x, y in zip(a, b, strict=True):
        assert [p.read_bytes() for p in x.image_paths] == [p.read_bytes() for p in y.image_paths]
    other_seed = make_tiny_vlm_suite(task, 3, 1, tmp_path / "c")
    assert [e.question for e in other_seed] != [e.question for e in a]


def test_boards4_shows_four_boards_whose_names_share_no_first_name_or_surname(tmp_path):
    for example in make_tiny_vlm_suite("boards4_codes", 10, 0, tmp_path):
        assert len(example.image_paths) == BOARDS_PER_PROMPT
        assert all(p.is_file() for p in example.image_paths)
        names = [name for board in example.extra["names"] for name in board]
        assert 16 <= len(names) <= 20
        assert len({n.split()[0] for n in names}) == len(names)
        assert len({n.split()[1] for n in names}) == len(names)


def test_boards4_answer_is_the_code_written_next_to_the_name_on_its_board(tmp_path):
    for example in make_tiny_vlm_suite("boards4_codes", 10, 0, tmp_path):
        target = example.extra["target"]
        assert example.question == f"What is the code next to {target}?"
        assert example.answer_prefix == f"{target}:"
        holding = [k for k, text in enumerate(example.extra["cell_text"]) if f"{target}:" in text]
        assert holding == [example.extra["target_board"]]
        line = next(ln for ln in _lines(example.extra["cell_text"][holding[0]]) if ln.startswith(target))
        assert example.answers == [line.split(": ")[1]]


def test_boards4_targets_spread_over_the_four_boards(tmp_path):
    boards = {e.extra["target_board"] for e in make_tiny_vlm_suite("boards4_codes", 20, 0, tmp_path)}
    assert boards == set(range(BOARDS_PER_PROMPT))


def test_two_row_tasks_ask_the_same_held_out_image_as_the_one_row_task(tmp_path):
    for task, family in (("board_two_codes", "board"), ("chart_two_values", "chart")):
        for example in make_tiny_vlm_suite(task, 3, 0, tmp_path):
            expected = render(family, 0, example.extra["index"], "test")
            assert example.extra["cell_text"] == expected.text


def test_board_two_codes_answers_are_the_codes_on_the_two_named_lines(tmp_path):
    for example in make_tiny_vlm_suite("board_two_codes", 10, 0, tmp_path):
        first, second = example.extra["target"]
        assert first != second
        assert example.question == f"What are the codes next to {first} and {second}?"
        assert example.answer_prefix == f"{first}:"
        by_name = dict(line.split(": ") for line in _lines(example.extra["cell_text"]) if ": " in line)
        assert example.answers == [by_name[first], by_name[second]]


def test_chart_two_values_answers_are_the_values_printed_on_the_two_bars(tmp_path):
    for example in make_tiny_vlm_suite("chart_two_values", 10, 0, tmp_path):
        first, second = example.extra["target"]
        printed = {}
        for line in _lines(example.extra["cell_text"]):
            match = re.fullmatch(r"([A-Za-z]+)\s+(\d+)", line)
            if match:
                printed[match.group(1)] = match.group(2)
        assert example.answers == [printed[first], printed[second]]


def test_gui_ids_answer_is_the_three_digit_number_written_after_the_buttons_label(tmp_path):
    for example in make_tiny_vlm_suite("gui_ids", 10, 0, tmp_path):
        target = example.extra["target"]
        assert example.question == f"What is the number next to the {target} button?"
        assert example.answer_prefix == f"{target}:" and example.metric == "exact_match"
        text = example.extra["cell_text"]
        ids = {label: re.search(rf"\b{label}:(\d+)", text).group(1) for label in example.extra["buttons"]}
        assert all(len(i) == 3 for i in ids.values()) and len(set(ids.values())) == len(ids)
        assert example.answers == [ids[target]]


def test_gui_ids_windows_are_not_the_gui_marks_images(tmp_path):
    ids = make_tiny_vlm_suite("gui_ids", 3, 0, tmp_path / "ids")
    marks = make_tiny_vlm_suite("gui_marks", 3, 0, tmp_path / "marks")
    assert all(
        a.image_path.read_bytes() != b.image_path.read_bytes() for a, b in zip(ids, marks, strict=True)
    )


@pytest.mark.parametrize("digits", [1, 5])
def test_gui_ids_of_one_digit_or_more_than_four_are_refused(digits):
    with pytest.raises(ValueError, match="digits must be 2 to 4"):
        render_gui_ids("test/x", digits)


def test_two_row_targets_are_drawn_apart_from_the_one_row_question(tmp_path):
    # The second number asked is not always the one-row task's target: the question is new.
    examples = make_tiny_vlm_suite("board_two_codes", 20, 0, tmp_path)
    assert any(e.extra["target"][1] != render("board", 0, e.extra["index"]).extra["target"] for e in examples)


def test_a_four_board_prompt_holds_four_images_worth_of_image_tokens(tmp_path):
    from mixkv.eval.mm_example_run import encode_example, example_prompt
    from mixkv.tiny_vlm.model import image_tokens_per_image
    from tests.families import TOKEN_IDS, vlm_processor

    processor = vlm_processor("llava")
    one = make_tiny_vlm_suite("board_codes", 1, 0, tmp_path / "one")[0]
    four = make_tiny_vlm_suite("boards4_codes", 1, 0, tmp_path / "four")[0]
    counts = []
    for example in (one, four):
        ids = encode_example(processor, example, example_prompt(processor, example))["input_ids"]
        counts.append(int((ids == TOKEN_IDS["<image>"]).sum()))
    assert counts[1] == BOARDS_PER_PROMPT * counts[0] > 0
    assert image_tokens_per_image() * len(four.image_paths) == 1600


def test_numbers_recall_credits_each_number_read_in_its_place():
    assert numbers_recall("388474\nYara Pope: 678791", ["388474", "678791"]) == 1.0
    assert numbers_recall("5, Undo: 8 and 9", ["5", "8"]) == 1.0
    assert numbers_recall("388474\nYara Pope: 678", ["388474", "678791"]) == 0.5
    assert numbers_recall("388474", ["388474", "678791"]) == 0.5
    assert numbers_recall("54\nWheat: 54", ["96", "54"]) == 0.5


def test_numbers_recall_gives_no_credit_for_a_number_in_the_wrong_row():
    assert numbers_recall("678791\nGus Snow: 388474", ["388474", "678791"]) == 0.0
    assert numbers_recall("47, 96, 40, 35", ["47", "35"]) == 0.5


def test_numbers_recall_refuses_references_that_are_not_integers():
    with pytest.raises(ValueError, match="integer"):
        numbers_recall("5", ["five"])
    with pytest.raises(ValueError, match="at least one"):
        numbers_recall("5", [])


def test_score_examples_scores_two_row_examples_with_numbers_recall(tmp_path):
    examples = make_tiny_vlm_suite("chart_two_values", 2, 0, tmp_path)
    right = f"{examples[0].answers[0]}\n{examples[0].extra['target'][1]}: {examples[0].answers[1]}"
    half = examples[1].answers[0]
    assert score_examples(examples, [right, half]) == {"numbers_recall": 0.75}


def test_distinct_names_share_no_part_and_refuse_more_than_the_lists_hold():
    import random

    names = distinct_names(random.Random(0), 22)
    assert len({n.split()[0] for n in names}) == len({n.split()[1] for n in names}) == 22
    with pytest.raises(ValueError, match="between 0 and 22"):
        distinct_names(random.Random(0), 23)


def test_render_board_lists_exactly_the_names_given():
    board = render_board("test/x/0", ["Ada Moss", "Ben Reed"])
    assert board.extra["names"] == ["Ada Moss", "Ben Reed"]
    assert [ln.split(":")[0] for ln in _lines(board.text)[1:]] == ["Ada Moss", "Ben Reed"]
    with pytest.raises(ValueError, match="distinct names"):
        render_board("test/x/0", ["Ada Moss", "Ada Moss"])
    with pytest.raises(ValueError, match="distinct names"):
        render_board("test/x/0", [f"N{i} M" for i in range(GRID - 1)])


def test_an_example_cannot_have_both_frames_and_more_images(tmp_path):
    with pytest.raises(ValueError, match="frames or images"):
        MMExample(
            "x",
            tmp_path / "a.png",
            "q",
            ["1"],
            "exact_match",
            frames=[tmp_path / "f.png"],
            more_images=[tmp_path / "b.png"],
        )
