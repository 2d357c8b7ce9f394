"""Data-parallel ``mixkv eval``: two processes under ``torchrun`` (gloo on the CPU) write the files
one process writes; a run with a failed rank is resumed to them by one process, an interrupted
one-process run by two; the ranks' shares cover every example once; checkpoints are read by
example index, whichever process wrote them (:mod:`mixkv.eval.data_parallel`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mixkv.commands.eval import main as cli_main
from mixkv.eval.cell_store import Cell, load_partial, partial_path, save_partial
from mixkv.eval.data_parallel import DataParallel, data_parallel, grid_differences
from mixkv.eval.runner import TextGrid

ROOT = Path(__file__).resolve().parent.parent
#: Two protocols (each in its own directory, protocols.md comparing them), three methods decoded
#: together, four examples: ranks 0 and 1 of two take examples 0, 2 and 1, 3.
GRID = [
    "--methods", "full,snapkv,mixkv-snapkv", "--budgets", "40", "--tasks", "niah_single_1",
    "--context-lengths", "128", "-n", "4", "--max-new-tokens", "3", "--window-size", "8",
    "--protocol", "query_agnostic", "query_aware",
]  # fmt: skip
PROTOCOLS = ("query_agnostic", "query_aware")
#: Fields that hold times: they differ between any two runs.
TIMES = re.compile(r"(seconds|_s|finished_at)$")


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dp") / "model"
    tiny[0].save_pretrained(path)
    tiny[1].save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory) -> Path:
    """The grid run by one process (in this one)."""
    out = tmp_path_factory.mktemp("dp") / "one"
    assert cli_main(["--model", str(model_dir), *GRID, "--out", str(out)]) == 0
    return out


def launch(model_dir: Path, out: Path, module: str = "mixkv", **env: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node 2 -m MODULE [eval] GRID`` into ``out``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", module, *(["eval"] if module == "mixkv" else [])]
    command += ["--model", str(model_dir), *GRID, "--out", str(out)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=ROOT)


def _without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if not TIMES.search(k)}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def contents(out: Path) -> dict[str, Any]:
    """Every file a run wrote, times left out: JSON without its time fields, examples.csv without
    its time columns, Markdown with its time figures and the run's directory masked, anything else
    as bytes."""
    files: dict[str, Any] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = str(path.relative_to(out))
        if path.suffix == ".json":
            files[name] = _without_times(json.loads(path.read_text()))
        elif path.name == "examples.csv":
            rows = [line.split(",") for line in path.read_text().splitlines()]
            timed = [i for i, column in enumerate(rows[0]) if TIMES.search(column)]
            files[name] = [[v for i, v in enumerate(row) if i not in timed] for row in rows]
        elif path.suffix == ".md":
            text = path.read_text().replace(str(out), "OUT")  # protocols.md names the runs it compares
            files[name] = re.sub(r"(% / )[0-9.]+ / [0-9.]+", r"\1t / t", text)
        else:
            files[name] = path.read_bytes()
    return files


def test_each_example_is_computed_by_exactly_one_rank():
    for world_size in (1, 2, 3, 5):
        for n in (0, 1, 4, 7, 10):
            shares = [list(DataParallel(rank, world_size).share(n)) for rank in range(world_size)]
            assert sorted(i for share in shares for i in share) == list(range(n))


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank must be in"):
        DataParallel(2, 2)


def test_ranks_given_different_grids_are_named_with_what_differs():
    same = {"out_dir": "/a", "seed": 0}
    assert grid_differences([same, dict(same)]) is None
    problem = grid_differences([same, dict(same), {"out_dir": "/b", "seed": 0}])
    assert problem is not None and "Rank 2" in problem and "out_dir='/b' (rank 0: '/a')" in problem


def test_a_world_size_without_a_rank_says_how_to_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="torchrun or accelerate launch"), data_parallel():
        pass


def test_one_process_without_a_launcher_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with data_parallel() as dp:
        assert dp == DataParallel(0, 1)


CELL = Cell("snapkv", 40, "niah_single_1", 128)
IDENTITY = {"model": "m", "seed": 0}


def _record(index: int, by: str) -> dict[str, Any]:
    return {"example_sha1": f"digest{index}", "score": 1.0, "by": by}


def test_every_rank_checkpoint_is_read_by_example_index_the_first_holding_one_winning(tmp_path):
    save_partial(tmp_path, CELL, IDENTITY, {0: (_record(0, "one"), 1.0)})
    save_partial(
        tmp_path, CELL, IDENTITY, {0: (_record(0, "rank0"), 1.0), 2: (_record(2, "rank0"), 2.0)}, rank=0
    )
    save_partial(tmp_path, CELL, IDENTITY, {1: (_record(1, "rank1"), 3.0)}, rank=1)
    held = load_partial(tmp_path, CELL, IDENTITY, [f"digest{i}" for i in range(4)])
    assert {i: (record["by"], seconds) for i, (record, seconds) in held.items()} == {
        0: ("one", 1.0),
        1: ("rank1", 3.0),
        2: ("rank0", 2.0),
    }


def test_a_checkpointed_record_of_another_example_is_not_used(tmp_path):
    save_partial(
        tmp_path, CELL, IDENTITY, {0: (_record(0, "rank0"), 1.0), 2: (_record(2, "rank0"), 1.0)}, rank=0
    )
    held = load_partial(tmp_path, CELL, IDENTITY, ["digest0", "digest1", "another example"])
    assert sorted(held) == [0]


def test_a_checkpoint_written_before_indices_were_recorded_holds_examples_0_1_and_so_on(tmp_path):
    legacy = {"schema": 1, "cell": CELL.as_dict(), "identity": IDENTITY, "seconds": 4.0}
    legacy["examples"] = [_record(0, "old"), _record(1, "old")]
    partial_path(tmp_path, CELL).write_text(json.dumps(legacy))
    held = load_partial(tmp_path, CELL, IDENTITY, ["digest0", "digest1", "digest2"])
    assert {i: seconds for i, (_, seconds) in held.items()} == {0: 2.0, 1: 2.0}


def test_two_processes_write_the_files_one_process_writes(model_dir, one_process, tmp_path):
    done = launch(model_dir, tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 of 2: its share of the examples is done" in done.stdout
    assert contents(tmp_path / "two") == contents(one_process)


def _held_indices(cell_dir: Path, rank: int) -> set[int]:
    indices: set[int] = set()
    for path in cell_dir.glob(f".*.rank{rank}.partial"):
        indices |= set(json.loads(path.read_text())["indices"])
    return indices


@pytest.fixture(scope="module")
def failed_run(model_dir, tmp_path_factory) -> Path:
    """The grid launched on two processes, rank 1 failing on its second example (example 3)."""
    out = tmp_path_factory.mktemp("dp") / "failed"
    failed = launch(
        model_dir, out, module="tests.data_parallel_crash", MIXKV_TEST_FAIL_RANK="1", MIXKV_TEST_FAIL_AT="2"
    )
    assert failed.returncode != 0
    assert "A rank of the data-parallel grid failed" in failed.stderr and "RankFailed" in failed.stderr
    return out


def test_a_failed_rank_leaves_each_rank_its_share_checkpointed_and_no_cell_written(failed_run):
    for protocol in PROTOCOLS:  # rank 0 did examples 0 and 2; rank 1 example 1, then failed on 3
        assert _held_indices(failed_run / protocol / "cells", 0) == {0, 2}
        assert _held_indices(failed_run / protocol / "cells", 1) == {1}
        assert not list((failed_run / protocol / "cells").glob("*.json"))


def test_report_only_shows_a_failed_data_parallel_run_as_far_as_every_rank_went(
    model_dir, failed_run, tmp_path
):
    out = tmp_path / "failed"
    shutil.copytree(failed_run, out)
    assert cli_main(["--model", str(model_dir), *GRID, "--out", str(out), "--report-only"]) == 0
    report = (out / "query_aware" / "results.md").read_text()
    assert "A run in progress" in report and "n = 3 per cell" in report  # examples 0-2, without a gap


def test_a_failed_rank_is_resumed_by_one_process_computing_only_the_missing_example(
    model_dir, one_process, failed_run, tmp_path, monkeypatch
):
    out = tmp_path / "failed"
    shutil.copytree(failed_run, out)
    prepared: list[int] = []
    prepare = TextGrid.prepare

    def counted(self, example, pending):
        prepared.append(len(pending))
        return prepare(self, example, pending)

    monkeypatch.setattr(TextGrid, "prepare", counted)
    assert cli_main(["--model", str(model_dir), *GRID, "--out", str(out)]) == 0
    assert prepared == [2 * 3]  # example 3 alone, for its 3 cells under both protocols
    assert contents(out) == contents(one_process)


def test_an_interrupted_one_process_run_is_resumed_by_two_processes(
    model_dir, one_process, tmp_path, monkeypatch
):
    out = tmp_path / "interrupted"
    prepare, calls = TextGrid.prepare, [0]

    def interrupted(self, example, pending):
        calls[0] += 1
        if calls[0] == 3:  # examples 0 and 1 are checkpointed
            raise KeyboardInterrupt
        return prepare(self, example, pending)

    monkeypatch.setattr(TextGrid, "prepare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli_main(["--model", str(model_dir), *GRID, "--out", str(out)])
    monkeypatch.undo()
    done = launch(model_dir, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert contents(out) == contents(one_process)
