"""Tests of mixkv.eval.mm_datasets on tiny fixture files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mixkv.eval.mm_datasets import (
    TEXTCAPS_PROMPT,
    load_chartqa,
    load_docvqa,
    load_ocrbench,
    load_screenspot,
    load_textcaps,
    load_textvqa,
)
from mixkv.eval.mm_example import MMExample, score_examples


def _image(path: Path, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


def _json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def docvqa(tmp_path: Path) -> Path:
    _image(tmp_path / "documents" / "pybv0228_81.png")
    return _json(
        tmp_path / "val_v1.0.json",
        {
            "dataset_name": "docvqa",
            "dataset_split": "val",
            "data": [
                {
                    "questionId": 49153,
                    "question": "What is the ratio?",
                    "image": "documents/pybv0228_81.png",
                    "docId": 14465,
                    "answers": ["0.28", "0,28"],
                }
            ],
        },
    )


def test_docvqa_loads_fields(docvqa: Path) -> None:
    (ex,) = load_docvqa(docvqa)
    assert ex.id == "49153"
    assert ex.image_path == docvqa.parent / "documents" / "pybv0228_81.png"
    assert ex.question == "What is the ratio?"
    assert ex.answers == ["0.28", "0,28"]
    assert ex.metric == "anls"
    assert ex.extra["docId"] == 14465


def test_docvqa_test_split_without_answers_gives_empty_list(tmp_path: Path) -> None:
    _image(tmp_path / "documents" / "a.png")
    path = _json(
        tmp_path / "test.json", {"data": [{"questionId": 1, "question": "q?", "image": "documents/a.png"}]}
    )
    assert load_docvqa(path)[0].answers == []


def test_docvqa_missing_file_names_file_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json.*Expected layout.*questionId"):
        load_docvqa(tmp_path / "nope.json")


def test_docvqa_malformed_json_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json"):
        load_docvqa(bad)


def test_docvqa_missing_data_field_raises(tmp_path: Path) -> None:
    path = _json(tmp_path / "v.json", [{"questionId": 1}])
    with pytest.raises(ValueError, match="'data'"):
        load_docvqa(path)


def test_docvqa_missing_record_field_raises(tmp_path: Path) -> None:
    path = _json(tmp_path / "v.json", {"data": [{"questionId": 1, "image": "a.png"}]})
    with pytest.raises(ValueError, match="record 0 has no 'question'"):
        load_docvqa(path, check_images=False)


def test_missing_image_raises_file_not_found(tmp_path: Path) -> None:
    path = _json(tmp_path / "v.json", {"data": [{"questionId": 1, "question": "q", "image": "gone.png"}]})
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        load_docvqa(path)


def test_check_images_false_skips_missing_image(tmp_path: Path) -> None:
    path = _json(tmp_path / "v.json", {"data": [{"questionId": 1, "question": "q", "image": "gone.png"}]})
    assert load_docvqa(path, check_images=False)[0].image_path.name == "gone.png"


def test_limit_keeps_first_records(tmp_path: Path) -> None:
    records = [{"questionId": i, "question": "q", "image": "a.png", "answers": ["x"]} for i in range(5)]
    path = _json(tmp_path / "v.json", {"data": records})
    assert [e.id for e in load_docvqa(path, limit=2, check_images=False)] == ["0", "1"]


def test_textvqa_image_from_image_id(tmp_path: Path) -> None:
    _image(tmp_path / "train_images" / "003a8ae2ef43b901.jpg")
    path = _json(
        tmp_path / "TextVQA_0.5.1_val.json",
        {
            "dataset_name": "textvqa",
            "data": [
                {
                    "question_id": 34602,
                    "question": "what brand?",
                    "image_id": "003a8ae2ef43b901",
                    "answers": ["nokia"] * 10,
                }
            ],
        },
    )
    (ex,) = load_textvqa(path, tmp_path / "train_images")
    assert ex.id == "34602"
    assert ex.image_path.name == "003a8ae2ef43b901.jpg"
    assert ex.answers == ["nokia"] * 10
    assert ex.metric == "vqa_accuracy"


def test_textvqa_missing_image_dir_raises(tmp_path: Path) -> None:
    path = _json(tmp_path / "t.json", {"data": []})
    with pytest.raises(FileNotFoundError, match="TextVQA image folder"):
        load_textvqa(path, tmp_path / "missing")


def test_chartqa_label_becomes_answer(tmp_path: Path) -> None:
    _image(tmp_path / "png" / "41699051005347.png")
    path = _json(
        tmp_path / "test_human.json", [{"imgname": "41699051005347.png", "query": "How many?", "label": "19"}]
    )
    (ex,) = load_chartqa(path, tmp_path / "png")
    assert ex.id == "test_human_0"
    assert ex.question == "How many?"
    assert ex.answers == ["19"]
    assert ex.metric == "relaxed_accuracy"


def test_chartqa_requires_list(tmp_path: Path) -> None:
    (tmp_path / "png").mkdir()
    path = _json(tmp_path / "c.json", {"data": []})
    with pytest.raises(ValueError, match="list of JSON objects"):
        load_chartqa(path, tmp_path / "png")


def test_ocrbench_string_and_list_answers(tmp_path: Path) -> None:
    _image(tmp_path / "OCRBench_Images" / "IIIT5K" / "5_1.png")
    _image(tmp_path / "OCRBench_Images" / "HME100k" / "1.jpg")
    path = _json(
        tmp_path / "OCRBench.json",
        [
            {
                "dataset_name": "IIIT5K",
                "id": 0,
                "image_path": "IIIT5K/5_1.png",
                "question": "what is written in the image?",
                "answers": ["PRIVATE"],
                "type": "Regular Text Recognition",
            },
            {
                "dataset_name": "HME100k",
                "id": 1,
                "image_path": "HME100k/1.jpg",
                "question": "Please write out the expression of the formula in the image using LaTeX format.",
                "answers": "x ^ { 2 }",
                "type": "Handwritten Mathematical Expression Recognition",
            },
        ],
    )
    a, b = load_ocrbench(path, tmp_path / "OCRBench_Images")
    assert a.answers == ["PRIVATE"]
    assert b.answers == ["x ^ { 2 }"]
    assert b.extra == {"dataset_name": "HME100k", "type": "Handwritten Mathematical Expression Recognition"}
    assert a.metric == b.metric == "ocrbench"


def test_textcaps_groups_caption_records_per_image(tmp_path: Path) -> None:
    _image(tmp_path / "imgs" / "img1.jpg")
    _image(tmp_path / "imgs" / "img2.jpg")
    refs = ["a red bottle", "a bottle of wine"]
    path = _json(
        tmp_path / "TextCaps_0.1_val.json",
        {
            "data": [
                {"image_id": "img1", "caption_str": refs[0], "reference_strs": refs},
                {"image_id": "img1", "caption_str": refs[1], "reference_strs": refs},
                {"image_id": "img2", "caption_str": "a sign"},
                {"image_id": "img2", "caption_str": "a stop sign"},
            ]
        },
    )
    first, second = load_textcaps(path, tmp_path / "imgs")
    assert (first.id, first.answers) == ("img1", refs)
    assert (second.id, second.answers) == ("img2", ["a sign", "a stop sign"])
    assert first.question == TEXTCAPS_PROMPT
    assert first.metric == "cider_d"


def test_screenspot_converts_xywh_to_corners(tmp_path: Path) -> None:
    _image(tmp_path / "screenspot_imgs" / "web_1.png", (100, 80))
    path = _json(
        tmp_path / "screenspot_web.json",
        [
            {
                "img_filename": "web_1.png",
                "bbox": [10, 20, 30, 5],
                "instruction": "open menu",
                "data_type": "icon",
                "data_source": "shop",
            }
        ],
    )
    (ex,) = load_screenspot(path, tmp_path / "screenspot_imgs")
    # (x, y, w, h) = (10, 20, 30, 5) -> (10, 20, 10 + 30, 20 + 5)
    assert ex.extra["bbox"] == [10.0, 20.0, 40.0, 25.0]
    assert ex.answers == ["[10, 20, 40, 25]"]
    assert ex.extra["data_type"] == "icon"
    assert ex.extra["platform"] == "screenspot_web"
    assert ex.metric == "point_in_box"


def test_screenspot_bad_bbox_raises(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    path = _json(tmp_path / "s.json", [{"img_filename": "a.png", "bbox": [1, 2], "instruction": "x"}])
    with pytest.raises(ValueError, match=r"\[x, y, width, height\]"):
        load_screenspot(path, tmp_path / "imgs", check_images=False)


def test_screenspot_instruction_template(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    path = _json(tmp_path / "s.json", [{"img_filename": "a.png", "bbox": [0, 0, 1, 1], "instruction": "go"}])
    (ex,) = load_screenspot(
        path, tmp_path / "imgs", check_images=False, instruction_template="Click: {instruction}"
    )
    assert ex.question == "Click: go"


def test_mmexample_unknown_metric_raises() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        MMExample(id="1", image_path=Path("a.png"), question="q", answers=["a"], metric="bleu")


def test_score_examples_groups_by_metric(tmp_path: Path) -> None:
    img = _image(tmp_path / "a.png", (200, 100))
    examples = [
        MMExample("1", img, "q", ["hello"], "anls"),
        MMExample("2", img, "q", ["100"], "relaxed_accuracy"),
        MMExample("3", img, "q", ["104"], "relaxed_accuracy"),
        MMExample("4", img, "q", ["[0, 0, 100, 50]"], "point_in_box", {"bbox": [0, 0, 100, 50]}),
    ]
    # anls("hallo", "hello") = 0.8; relaxed: "104" vs 100 ok, "200" vs 104 wrong -> 0.5;
    # point: x = 0.25 * 200 = 50, y = 0.25 * 100 = 25 -> inside -> 1.0
    preds = ["hallo", "104", "200", "(0.25, 0.25)"]
    result = score_examples(examples, preds, coordinate_scale="normalized_1")
    assert result == pytest.approx({"anls": 0.8, "relaxed_accuracy": 0.5, "point_in_box": 1.0})


def test_score_examples_rejects_examples_without_answers(tmp_path: Path) -> None:
    examples = [MMExample("1", tmp_path / "a.png", "q", [], "anls")]
    with pytest.raises(ValueError, match="no reference answers"):
        score_examples(examples, ["x"])
