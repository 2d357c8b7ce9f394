"""Tests of ``mixkv compare``: two eval runs paired on the same examples."""

from __future__ import annotations

import json

import pytest

from mixkv.commands import main as mixkv_main
from mixkv.eval.cell_store import cell_filename
from mixkv.eval.compare_runs import compare_runs, read_run
from mixkv.eval.runner import run_eval
from tests.helpers_tiny import SMALL_GRID, tiny_model_and_tokenizer


def _records(scores, digests=None, metric="substring"):
    digests = digests or [f"example-{i}" for i in range(len(scores))]
    return [
        {"score": float(s), "example_sha1": d, "metric": metric} for s, d in zip(scores, digests, strict=True)
    ]


def _write_cell(run, method, budget, scores, *, task="agg_list", length=2048, dtype="float32", **record_kw):
    """A finished cell file as ``mixkv eval`` writes it (the fields compare reads)."""
    cells = run / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    records = _records(scores, **record_kw)
    data = {
        "cell": {"method": method, "budget": budget, "task": task, "context_length": length},
        "identity": {"model": "qwen2.5-coder-0.5b", "dtype": dtype, "seed": 0},
        "config": {"methods": ["full", "snapkv", "mixkv-snapkv"]},
        "versions": {"torch": "2.13.0+cpu", "transformers": "5.2.0"},
        "score": sum(scores) / len(scores),
        "examples": records,
    }
    (cells / cell_filename(method, budget, task, length)).write_text(json.dumps(data))


def _write_checkpoint(run, method, budget, scores, *, task="agg_list", length=2048, dtype="float32"):
    """An unfinished cell's checkpoint (no score, no versions)."""
    cells = run / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    data = {
        "cell": {"method": method, "budget": budget, "task": task, "context_length": length},
        "identity": {"model": "qwen2.5-coder-0.5b", "dtype": dtype, "seed": 0},
        "seconds": 1.0,
        "examples": _records(scores),
    }
    (cells / f".{cell_filename(method, budget, task, length)}.partial").write_text(json.dumps(data))


def _row(lines, *first_columns):
    prefix = "| " + " | ".join(first_columns) + " |"
    return next(line for line in lines if line.startswith(prefix))


def test_a_run_compared_with_itself_ties_on_every_example(tmp_path):
    _write_cell(tmp_path / "a", "snapkv", 128, [1, 0, 1, 1])
    row = _row(compare_runs(tmp_path / "a", tmp_path / "a"), "snapkv", "128")
    assert "| 4 | 75.0 | 75.0 | +0.0 [+0.0, +0.0] | 0 / 4 / 0 | 1.000 |" in row


def test_a_consistent_gain_of_run_b_is_counted_and_bold(tmp_path):
    _write_cell(tmp_path / "a", "snapkv", 128, [0] * 10)
    _write_cell(tmp_path / "b", "snapkv", 128, [1] * 6 + [0] * 4)
    row = _row(compare_runs(tmp_path / "a", tmp_path / "b"), "snapkv", "128")
    assert "**+60.0 [" in row and "| 6 / 4 / 0 | 0.031 |" in row


def test_cells_are_cut_to_the_examples_both_runs_have(tmp_path):
    _write_cell(tmp_path / "a", "snapkv", 128, [1, 1, 1, 0, 0])
    _write_checkpoint(tmp_path / "b", "snapkv", 128, [0, 1, 1])  # a run in progress
    row = _row(compare_runs(tmp_path / "a", tmp_path / "b"), "snapkv", "128")
    assert "| 1 | 3 | 100.0 | 66.7 |" in row and "0 / 2 / 1" in row


def test_a_finished_cell_is_read_instead_of_its_checkpoint(tmp_path):
    _write_checkpoint(tmp_path / "a", "snapkv", 128, [0])
    _write_cell(tmp_path / "a", "snapkv", 128, [1, 1])
    assert [e["score"] for e in read_run(tmp_path / "a")[("snapkv", 128, "agg_list", 2048)]["examples"]] == [
        1,
        1,
    ]


def test_cells_pool_over_tasks_with_a_per_cell_table(tmp_path):
    for task, scores in (("agg_list", [1, 0]), ("multihop", [1, 1, 0])):
        _write_cell(tmp_path / "a", "snapkv", 64, scores, task=task)
        _write_cell(tmp_path / "b", "snapkv", 64, [0] * len(scores), task=task)
    lines = compare_runs(tmp_path / "a", tmp_path / "b")
    assert "| 2 | 5 | 60.0 | 0.0 |" in _row(lines, "snapkv", "64")
    assert "## Per (task, context length)" in lines
    assert "| 3 | 66.7 | 0.0 |" in _row(lines, "snapkv", "64", "multihop", "2048")


def test_the_header_says_what_differs_between_the_runs_and_what_does_not(tmp_path):
    _write_cell(tmp_path / "a", "full", None, [1, 0])
    _write_cell(tmp_path / "b", "full", None, [1, 0], dtype="bfloat16")
    lines = compare_runs(tmp_path / "a", tmp_path / "b")
    assert "- What differs: dtype float32 (A) vs bfloat16 (B)" in lines
    assert any(line.startswith("- Same in both:") and "model qwen2.5-coder-0.5b" in line for line in lines)
    assert "| 2 | 50.0 | 50.0 |" in _row(lines, "full", "-")


def test_examples_that_are_not_the_same_in_both_runs_are_refused(tmp_path):
    _write_cell(tmp_path / "a", "snapkv", 128, [1, 0])
    _write_cell(tmp_path / "b", "snapkv", 128, [1, 0], digests=["example-0", "other"])
    with pytest.raises(ValueError, match="example 1 differs between the runs"):
        compare_runs(tmp_path / "a", tmp_path / "b")


def test_records_that_cannot_be_identified_are_refused(tmp_path):
    _write_cell(tmp_path / "a", "snapkv", 128, [1])
    path = tmp_path / "a" / "cells" / cell_filename("snapkv", 128, "agg_list", 2048)
    data = json.loads(path.read_text())
    del data["examples"][0]["example_sha1"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="carries no example_sha1"):
        compare_runs(tmp_path / "a", tmp_path / "a")


def test_a_corpus_level_checkpoint_is_left_out_with_a_note(tmp_path):
    _write_checkpoint(tmp_path / "a", "snapkv", 128, [0.4, 0.9])
    path = next((tmp_path / "a" / "cells").iterdir())
    data = json.loads(path.read_text())
    for record in data["examples"]:
        record["metric"] = "cider_d"
    path.write_text(json.dumps(data))
    _write_cell(tmp_path / "a", "full", None, [1])
    lines = compare_runs(tmp_path / "a", tmp_path / "a")
    assert any("1 cell(s) with a corpus-level score" in line for line in lines)
    assert not any(line.startswith("| snapkv |") for line in lines)


def test_only_the_methods_asked_for_are_compared(tmp_path):
    for method, budget in (("full", None), ("snapkv", 128)):
        _write_cell(tmp_path / "a", method, budget, [1])
    lines = compare_runs(tmp_path / "a", tmp_path / "a", methods=["snapkv"])
    assert any(line.startswith("| snapkv |") for line in lines)
    assert not any(line.startswith("| full |") for line in lines)


def test_runs_without_a_common_cell_are_refused(tmp_path):
    _write_cell(tmp_path / "a", "snapkv", 128, [1])
    _write_cell(tmp_path / "b", "snapkv", 256, [1])
    with pytest.raises(ValueError, match=r"no .* cell in common"):
        compare_runs(tmp_path / "a", tmp_path / "b")


def test_a_directory_without_cells_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no cells"):
        read_run(tmp_path)


def test_the_command_prints_and_writes_the_table_and_exits_2_on_bad_input(tmp_path, capsys):
    _write_cell(tmp_path / "a", "snapkv", 128, [1, 0])
    out = tmp_path / "compare.md"
    assert mixkv_main(["compare", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(out)]) == 0
    assert "| snapkv | 128 |" in capsys.readouterr().out and "| snapkv | 128 |" in out.read_text()
    assert mixkv_main(["compare", str(tmp_path / "a"), str(tmp_path / "empty")]) == 2
    assert "holds no cells" in capsys.readouterr().err


def test_two_real_runs_of_different_protocols_pair_every_cell(tmp_path):
    tiny = tiny_model_and_tokenizer(seed=0)
    grid = {**SMALL_GRID, "methods": ["full", "snapkv"]}
    run_eval(tiny, out_dir=tmp_path / "aware", protocol="query_aware", **grid)
    run_eval(tiny, out_dir=tmp_path / "agnostic", protocol="query_agnostic", **grid)
    lines = compare_runs(tmp_path / "aware", tmp_path / "agnostic")
    assert "- What differs: protocol query_aware (A) vs query_agnostic (B)" in lines
    assert "| 1 | 2 |" in _row(lines, "full", "-") and "| 1 | 2 |" in _row(lines, "snapkv", "40")
