"""Video in the multimodal evaluation harness: Video-MME files, the synthetic video-needle task,
the multiple-choice metric, and video token counts in the per-example records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mixkv.eval import mm_runner
from mixkv.eval.mm_datasets import VIDEOMME_PROMPT, load_videomme
from mixkv.eval.mm_example import score_examples
from mixkv.eval.mm_metrics import multiple_choice_letter
from mixkv.eval.mm_runner import run_mm_eval
from mixkv.eval.mm_tasks import load_mm_task
from mixkv.eval.synthetic_images import VIDEO_NEEDLE_QUESTION, make_synthetic_video_suite
from mixkv.presses.registry import build_press
from tests.families import draw_image, vlm_processor
from tests.video_families import build_video_case

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def videomme_dir(tmp_path_factory):
    """A Video-MME annotation file (official columns) and extracted frames of two videos."""
    root = tmp_path_factory.mktemp("videomme")
    records = []
    for v, video_id in enumerate(["fFjv93ACGo8", "Ab3dE5fGh7I"]):
        (root / "frames" / video_id).mkdir(parents=True)
        for k in range(10 if v == 0 else 3):
            draw_image(200 + 10 * v + k, 128, 128).save(root / "frames" / video_id / f"{k + 1:05d}.jpg")
        records.append(
            {
                "video_id": f"00{v + 1}",
                "duration": "short",
                "domain": "Knowledge",
                "videoID": video_id,
                "question_id": f"00{v + 1}-1",
                "task_type": "Counting Problem",
                "question": f"How many shapes are shown in video {v}?",
                "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."],
                "answer": "BC"[v],
            }
        )
    (root / "videomme.json").write_text(json.dumps(records))
    return root


def test_videomme_records_become_multiple_choice_video_examples(videomme_dir):
    first, second = load_videomme(videomme_dir / "videomme.json", videomme_dir / "frames", num_frames=4)
    assert first.is_video and first.metric == "multiple_choice" and first.answers == ["B"]
    assert first.id == "001-1" and first.extra["task_type"] == "Counting Problem"
    assert [f.name for f in first.frames] == ["00001.jpg", "00004.jpg", "00007.jpg", "00010.jpg"]
    assert len(second.frames) == 3  # a video with fewer frames than asked keeps them all
    assert first.question.splitlines() == [
        "How many shapes are shown in video 0?",
        "A. 1.",
        "B. 2.",
        "C. 3.",
        "D. 4.",
        VIDEOMME_PROMPT,
    ]


def test_videomme_without_the_frames_of_a_video_names_the_folder(videomme_dir, tmp_path):
    (tmp_path / "frames").mkdir()
    with pytest.raises(FileNotFoundError, match="fFjv93ACGo8"):
        load_videomme(videomme_dir / "videomme.json", tmp_path / "frames")


@pytest.mark.parametrize(
    ("output", "letter"),
    [
        ("B", "B"),
        ("(C) three", "C"),
        ("D. 4.", "D"),
        ("The answer is A.", "A"),
        ("three", None),
        ("I think", None),
    ],
)
def test_multiple_choice_letter_is_read_off_the_output(output, letter):
    assert multiple_choice_letter(output) == letter


def test_multiple_choice_accuracy_compares_letters(videomme_dir):
    examples = load_videomme(videomme_dir / "videomme.json", videomme_dir / "frames")
    assert score_examples(examples, ["B. 2.", "A"]) == {"multiple_choice": 0.5}


def test_video_needle_code_is_drawn_in_one_frame_only(tmp_path):
    (example,) = make_synthetic_video_suite(1, 0, tmp_path, num_frames=6, frame_size=(160, 128))
    assert example.question == VIDEO_NEEDLE_QUESTION and len(example.frames) == 6
    # The code and its box are drawn in dark ink (channels <= 60); distractors are gray, backgrounds light.
    dark = [int((np.asarray(Image.open(f)).max(-1) <= 60).sum()) for f in example.frames]
    needle = example.extra["needle_frame"]
    assert dark[needle] > 0 and sum(dark) == dark[needle]


def test_video_needle_suite_is_reproducible(tmp_path):
    first = make_synthetic_video_suite(2, 5, tmp_path / "a", num_frames=3)
    second = make_synthetic_video_suite(2, 5, tmp_path / "b", num_frames=3)
    assert [e.answers for e in first] == [e.answers for e in second]
    for a, b in zip(first, second, strict=True):
        assert [f.read_bytes() for f in a.frames] == [f.read_bytes() for f in b.frames]


@pytest.fixture(scope="module")
def qwen_video():
    return build_video_case("qwen2_vl")


def test_video_example_record_counts_video_tokens_kept(qwen_video, tmp_path):
    (example,) = load_mm_task("synthetic_video_needle", limit=1, synthetic_dir=tmp_path)
    inputs = mm_runner.encode_example(
        qwen_video.processor, example, mm_runner.example_prompt(qwen_video.processor, example)
    )
    video_tokens = int((inputs["input_ids"] == qwen_video.video_token_id).sum())
    press = build_press("mixkv-snapkv", 24, context_tokens=int(inputs["input_ids"].shape[1]), window_size=8)
    record = mm_runner.run_mm_example(
        qwen_video.model, qwen_video.processor, example, press, max_new_tokens=2
    )
    assert record["prompt"].startswith("<|vision_start|><|video_pad|><|vision_end|>\n")
    assert record["frames"] == 8 and record["image_tokens"] == 0
    assert record["video_tokens"] == record["video_tokens_total"] == video_tokens > 24
    assert 0 < record["video_tokens_kept"] < video_tokens
    assert record["report"]["visual_tokens_total"] == [video_tokens]


def test_videomme_grid_cell_records_video_token_means(qwen_video, videomme_dir, tmp_path):
    tasks = {"videomme": load_videomme(videomme_dir / "videomme.json", videomme_dir / "frames", num_frames=4)}
    result = run_mm_eval(
        (qwen_video.model, qwen_video.processor),
        tasks,
        methods=["mixkv-snapkv"],
        budgets=[24],
        out_dir=tmp_path,
        window_size=8,
        max_new_tokens=2,
    )
    (cell,) = result.computed
    data = json.loads((tmp_path / "cells" / cell).read_text())
    assert data["video_tokens_total_mean"] > 24
    assert all(r["metric"] == "multiple_choice" for r in data["examples"])


def test_video_example_needs_a_processor_with_a_video_processor(tmp_path):
    (example,) = make_synthetic_video_suite(1, 0, tmp_path, num_frames=2)
    processor = vlm_processor("qwen2_vl")
    with pytest.raises(ValueError, match="has no video processor"):
        mm_runner.encode_example(processor, example, "<|vision_start|><|video_pad|><|vision_end|>\nWhat?")
