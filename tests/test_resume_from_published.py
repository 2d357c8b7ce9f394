"""Tests of continuing a run from its published records (``run_eval(resume_from=...)``,
``mixkv eval --resume-from``): a published ``examples.csv`` + ``run.json`` is all another machine
needs to extend a sweep, and a record is never reused for another run or another example."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from mixkv.eval.runner import run_eval
from tests.test_runner import BOTH, CELLS, GRID, _interrupt_after, cli_run_eval_arguments


def _publish(run_dir, published):
    """What a publication keeps of a run: its examples.csv and run.json, nothing else."""
    published.mkdir(parents=True)
    for name in ("examples.csv", "run.json"):
        shutil.copy(run_dir / name, published / name)
    return published


def _by_method(result):
    return {c["cell"]["method"]: c["examples"] for c in result.cells}


def test_a_run_writes_its_identity_beside_its_examples(tiny, tmp_path):
    run_eval(tiny, out_dir=tmp_path, **GRID)
    written = json.loads((tmp_path / "run.json").read_text())
    cell = json.loads((tmp_path / "cells" / CELLS[0]).read_text())
    assert written["identity"] == cell["identity"] and written["config"]["n"] == GRID["n"]


def test_a_published_run_is_extended_elsewhere_computing_only_the_new_examples(tiny, tmp_path, monkeypatch):
    first = run_eval(tiny, out_dir=tmp_path / "first", **GRID)
    published = _publish(tmp_path / "first", tmp_path / "published")
    count = _interrupt_after(monkeypatch, 10**6)
    extended = run_eval(tiny, out_dir=tmp_path / "elsewhere", resume_from=published, **{**GRID, "n": 3})
    assert count[0] == len(CELLS)  # one new example per cell
    monkeypatch.undo()
    fresh = run_eval(tiny, out_dir=tmp_path / "fresh", **{**GRID, "n": 3})
    for method, examples in _by_method(extended).items():
        again = _by_method(fresh)[method]
        assert [e["output"] for e in examples] == [e["output"] for e in again]
        assert [e["score"] for e in examples] == [e["score"] for e in again]
        before = _by_method(first)[method]
        assert [e["kv_fraction"] for e in examples[:2]] == [e["kv_fraction"] for e in before]
        assert [e.get("resumed_from") for e in examples] == [str(published)] * 2 + [None]


def test_a_published_record_is_kept_only_for_the_example_it_was_computed_on(tiny, tmp_path, monkeypatch):
    run_eval(tiny, out_dir=tmp_path / "first", **GRID)
    published = _publish(tmp_path / "first", tmp_path / "published")
    with (published / "examples.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if row["example"] == "1":
            row["example_sha1"] = "0" * 40  # as if the task generator had changed
    with (published / "examples.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    count = _interrupt_after(monkeypatch, 10**6)
    resumed = run_eval(tiny, out_dir=tmp_path / "elsewhere", resume_from=published, **GRID)
    assert count[0] == len(CELLS)  # example 1 recomputed in every cell
    assert all("resumed_from" not in e for c in resumed.cells for e in c["examples"][1:])


def test_a_published_run_of_another_identity_is_refused_saying_what_differs(tiny, tmp_path):
    run_eval(tiny, out_dir=tmp_path / "first", **GRID)
    published = _publish(tmp_path / "first", tmp_path / "published")
    with pytest.raises(ValueError, match=r"seed=0.*this run has seed=1"):
        run_eval(tiny, out_dir=tmp_path / "elsewhere", resume_from=published, **{**GRID, "seed": 1})


def test_resuming_needs_the_published_examples_and_identity(tiny, tmp_path):
    run_eval(tiny, out_dir=tmp_path / "first", **GRID)
    published = _publish(tmp_path / "first", tmp_path / "published")
    (published / "run.json").unlink()
    with pytest.raises(ValueError, match=r"run\.json missing"):
        run_eval(tiny, out_dir=tmp_path / "elsewhere", resume_from=published, **GRID)
    with pytest.raises(ValueError, match="Nothing to resume from"):
        run_eval(tiny, out_dir=tmp_path / "elsewhere", resume_from=tmp_path / "nowhere", **GRID)


@pytest.mark.parametrize("flags", [{"report_only": True}, {"resume": False}])
def test_resuming_from_a_publication_is_refused_where_nothing_would_be_computed_or_resumed(
    tiny, tmp_path, flags
):
    run_eval(tiny, out_dir=tmp_path / "first", **GRID)
    with pytest.raises(ValueError, match="resume_from continues a run"):
        run_eval(tiny, out_dir=tmp_path / "elsewhere", resume_from=tmp_path / "first", **GRID, **flags)


def test_both_protocols_resume_from_the_published_protocols_and_compute_the_others(
    tiny, tmp_path, monkeypatch
):
    run_eval(tiny, out_dir=tmp_path / "first", protocol="query_aware", **GRID)
    _publish(tmp_path / "first", tmp_path / "published" / "query_aware")
    count = _interrupt_after(monkeypatch, 10**6)
    both = run_eval(
        tiny, out_dir=tmp_path / "elsewhere", protocol=BOTH, resume_from=tmp_path / "published", **GRID
    )
    assert count[0] == len(CELLS) * GRID["n"]  # only query_agnostic computed
    monkeypatch.undo()
    fresh = run_eval(tiny, out_dir=tmp_path / "fresh", protocol=BOTH, **GRID)
    assert {(c["identity"]["protocol"], c["cell"]["method"]): c["score"] for c in both.cells} == {
        (c["identity"]["protocol"], c["cell"]["method"]): c["score"] for c in fresh.cells
    }


def test_cli_passes_resume_from(monkeypatch):
    arguments = cli_run_eval_arguments(monkeypatch, ["--resume-from", "docs/results/run"])
    assert arguments["resume_from"] == "docs/results/run"
