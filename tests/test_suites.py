"""Tests of the fixed evaluation suites and their comparison with a recorded reference."""

from __future__ import annotations

import json

import pytest

from mixkv.eval.suites import SUITES, compare_with_reference, suite_scores


def _cell(method, budget, task, scores):
    return {
        "cell": {"method": method, "budget": budget, "task": task, "context_length": 1024},
        "examples": [{"score": s} for s in scores],
    }


def test_suite_scores_pool_every_task_of_a_method_with_an_interval():
    cells = [
        _cell("snapkv", 128, "a", [1, 1, 0]),
        _cell("snapkv", 128, "b", [1, 0, 0]),
        _cell("full", None, "a", [1]),
    ]
    scores = suite_scores(cells)
    assert set(scores) == {"snapkv@128", "full"}
    assert scores["snapkv@128"]["n"] == 6 and scores["snapkv@128"]["mean"] == pytest.approx(50.0)
    assert scores["snapkv@128"]["low"] < 50.0 < scores["snapkv@128"]["high"]


def test_a_method_outside_its_recorded_interval_is_flagged_moved(tmp_path):
    reference = tmp_path / "quick.json"
    recorded = {"snapkv@128": {"n": 30, "mean": 60.0, "low": 45.0, "high": 75.0}}
    reference.write_text(json.dumps({"suite": "quick", "scores": recorded}))
    inside = {"snapkv@128": {"n": 30, "mean": 70.0, "low": 50.0, "high": 85.0}}
    outside = {"snapkv@128": {"n": 30, "mean": 30.0, "low": 15.0, "high": 45.0}}
    assert "within" in compare_with_reference("quick", inside, reference)[-1]
    assert "MOVED" in compare_with_reference("quick", outside, reference)[-1]


def test_the_quick_suite_has_a_recorded_reference_for_each_of_its_methods():
    suite = SUITES["quick"]
    lines = compare_with_reference("quick", {})
    assert not lines[0].startswith("No recorded reference"), lines[0]
    expected = {m if m == "full" else f"{m}@{b}" for m in suite.methods for b in suite.budgets}
    assert {line.split(" | ")[0].removeprefix("| ") for line in lines[4:]} == expected
