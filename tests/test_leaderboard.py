"""Tests of the leaderboard (``mixkv leaderboard``): methods ranked per budget from examples.csv."""

from __future__ import annotations

import csv
import random

import pytest

from mixkv.commands import main as mixkv_main
from mixkv.eval.leaderboard_tables import read_grid, standings, unfinished
from mixkv.eval.reporting import EXAMPLE_COLUMNS

TASKS = ("agg_list", "multihop")


def _write_grid(path, scores, *, kv_fraction=0.1, tasks=TASKS, digests=None):
    """examples.csv with ``scores[(method, budget)]`` = per-example scores, the same on every task;
    ``digests[(method, budget)][i]`` names example ``i`` (``f"{task}-{i}"`` where not given)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=EXAMPLE_COLUMNS)
        writer.writeheader()
        for (method, budget), values in scores.items():
            names = (digests or {}).get((method, budget), range(len(values)))
            for task in tasks:
                for i, score in enumerate(values):
                    writer.writerow(
                        {
                            "method": method,
                            "budget": "" if budget is None else budget,
                            "task": task,
                            "context_length": 2048,
                            "example": i,
                            "example_sha1": f"{task}-{names[i]}",
                            "score": score,
                            "kv_fraction": 1.0 if budget is None else kv_fraction,
                            "prefill_seconds": 2.0,
                        }
                    )
    return path


def test_methods_are_ranked_by_task_average_score_with_the_leader_first(tmp_path):
    grid = read_grid(
        _write_grid(
            tmp_path / "examples.csv", {("snapkv", 64): [0, 1, 0, 1] * 10, ("mixkv-snapkv", 64): [1] * 40}
        )
    )
    ranked, _ = standings(grid, 64)
    assert [s.method for s in ranked] == ["mixkv-snapkv", "snapkv"]
    assert ranked[0].score == 1.0 and ranked[1].score == 0.5
    assert ranked[0].n == 80 and ranked[0].against_leader is None


def test_a_method_clearly_behind_the_leader_is_not_level(tmp_path):
    grid = read_grid(
        _write_grid(
            tmp_path / "examples.csv", {("snapkv", 64): [0, 1, 0, 1] * 10, ("mixkv-snapkv", 64): [1] * 40}
        )
    )
    behind = standings(grid, 64)[0][1].against_leader
    assert behind is not None and behind.significant and behind.difference == pytest.approx(-0.5)
    assert (behind.wins, behind.ties, behind.losses) == (0, 40, 40)
    assert not standings(grid, 64)[0][1].level_with_leader


def test_a_method_one_example_behind_is_level_with_the_leader(tmp_path):
    grid = read_grid(_write_grid(tmp_path / "examples.csv", {("a", 64): [1] * 20, ("b", 64): [1] * 19 + [0]}))
    second = standings(grid, 64)[0][1]
    assert second.method == "b" and second.level_with_leader


def test_methods_are_paired_on_the_examples_both_hold(tmp_path):
    path = _write_grid(
        tmp_path / "examples.csv",
        {("a", 64): [1, 1, 1, 1], ("b", 64): [0, 0, 0, 0]},
        digests={("b", 64): [0, 1, "x2", "x3"]},  # b's last two examples are not a's
    )
    comparison = standings(read_grid(path), 64)[0][1].against_leader
    assert comparison is not None and comparison.n == 4  # 2 shared examples on each of 2 tasks


def test_intervals_do_not_depend_on_the_order_of_the_rows(tmp_path):
    draw = random.Random(0)
    scores = {(m, 64): [draw.random() for _ in range(30)] for m in ("a", "b")}  # partial-credit scores
    path = _write_grid(tmp_path / "examples.csv", scores)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    draw.shuffle(rows)
    shuffled = tmp_path / "shuffled.csv"
    with shuffled.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=EXAMPLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    assert standings(read_grid(shuffled), 64) == standings(read_grid(path), 64)


def test_a_method_with_fewer_examples_than_the_others_is_not_ranked_but_reported_unfinished(tmp_path):
    grid = read_grid(_write_grid(tmp_path / "examples.csv", {("a", 64): [1, 0, 1, 0], ("b", 64): [1, 1]}))
    ranked, _ = standings(grid, 64)
    assert [s.method for s in ranked] == ["a"]
    (b,) = unfinished(grid, 64)
    assert (b.method, b.n, b.of, b.leader) == ("b", 4, 8, "a")


def test_an_unfinished_method_is_compared_with_the_leader_on_the_examples_it_holds(tmp_path):
    grid = read_grid(_write_grid(tmp_path / "examples.csv", {("a", 64): [0, 0, 1, 1], ("b", 64): [1, 1]}))
    (b,) = unfinished(grid, 64)
    assert b.against_leader is not None and b.against_leader.n == 4  # examples 0 and 1 of each task
    assert b.against_leader.difference == 1.0


def test_a_method_missing_a_task_is_not_ranked(tmp_path):
    path = _write_grid(tmp_path / "examples.csv", {("a", 64): [1, 0]})
    _write_grid(tmp_path / "other.csv", {("b", 64): [1, 1]}, tasks=("agg_list",))
    with path.open("a", newline="", encoding="utf-8") as handle:
        handle.writelines((tmp_path / "other.csv").read_text().splitlines(keepends=True)[1:])
    ranked, _ = standings(read_grid(path), 64)
    assert [s.method for s in ranked] == ["a"]
    assert [(u.method, u.n, u.of) for u in unfinished(read_grid(path), 64)] == [("b", 2, 4)]


def test_full_cache_is_a_reference_line_not_a_ranked_method(tmp_path):
    grid = read_grid(
        _write_grid(tmp_path / "examples.csv", {("full", None): [1, 1, 1, 0], ("snapkv", 64): [1, 0, 0, 0]})
    )
    ranked, references = standings(grid, 64)
    assert [s.method for s in ranked] == ["snapkv"]
    assert [(r.method, r.score, r.kv_fraction) for r in references] == [("full", 0.75, 1.0)]


def test_kv_fraction_and_prefill_are_means_of_the_records(tmp_path):
    grid = read_grid(_write_grid(tmp_path / "examples.csv", {("snapkv", 64): [1, 0]}, kv_fraction=0.25))
    (s,), _ = standings(grid, 64)
    assert s.kv_fraction == pytest.approx(0.25) and s.prefill_seconds == pytest.approx(2.0)


def test_a_row_without_a_numeric_score_is_refused_by_name(tmp_path):
    path = _write_grid(tmp_path / "examples.csv", {("snapkv", 64): [1]})
    path.write_text(path.read_text().replace(",1,0.1,", ",,0.1,", 1))
    with pytest.raises(ValueError, match=r"snapkv at budget 64 on agg_list.*no numeric score"):
        read_grid(path)


def test_a_file_that_is_not_an_examples_csv_is_refused(tmp_path):
    (tmp_path / "examples.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        read_grid(tmp_path)
    with pytest.raises(ValueError, match=r"No examples\.csv"):
        read_grid(tmp_path / "missing")


def test_the_leaderboard_reads_what_mixkv_eval_writes(tmp_path):
    from mixkv.eval.runner import run_eval
    from tests.helpers_tiny import SMALL_GRID, tiny_model_and_tokenizer

    run_eval(
        tiny_model_and_tokenizer(seed=0),
        out_dir=tmp_path / "run",
        **{**SMALL_GRID, "methods": ["full", "snapkv", "mixkv-snapkv"]},
    )
    ranked, references = standings(read_grid(tmp_path / "run"), 40)
    assert sorted(s.method for s in ranked) == ["mixkv-snapkv", "snapkv"]
    assert [r.method for r in references] == ["full"]
    assert all(s.n == 2 and 0 < s.kv_fraction < 1 for s in ranked)


def test_mixkv_leaderboard_writes_one_section_and_plot_per_grid(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _write_grid(
        tmp_path / "a.csv", {("full", None): [1, 1], ("snapkv", 64): [1, 0], ("mixkv-snapkv", 64): [1, 1]}
    )
    _write_grid(tmp_path / "b.csv", {("snapkv", 128): [1, 1], ("kvzip", 128): [1]})
    code = mixkv_main(
        [
            "leaderboard",
            f"Grid A={tmp_path / 'a.csv'}",
            f"Grid B={tmp_path / 'b.csv'}",
            "--out",
            str(tmp_path / "lb"),
        ]
    )
    assert code == 0
    text = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "## Grid A" in text and "## Grid B" in text and "* full cache: 100.0" in text
    assert "| 64 | 1 | mixkv-snapkv | 100.0 [100.0, 100.0] | 4 | 10.0% | leader |" in text
    assert "* kvzip at 128: 2 of 4 examples; against snapkv: +0.0 [+0.0, +0.0] (level), n = 2" in text
    assert (tmp_path / "lb" / "leaderboard-1.png").is_file() and (
        tmp_path / "lb" / "leaderboard-2.png"
    ).is_file()
    assert "## Grid A" in capsys.readouterr().out


def test_mixkv_leaderboard_refuses_an_argument_without_a_title(tmp_path, capsys):
    assert mixkv_main(["leaderboard", str(tmp_path / "a.csv"), "--out", str(tmp_path)]) == 2
    assert "is not TITLE=RUN" in capsys.readouterr().err


def test_excluded_methods_are_left_out_of_the_ranking_and_named(tmp_path):
    _write_grid(tmp_path / "a.csv", {("kvzip", 64): [1, 1], ("snapkv", 64): [1, 0], ("keydiff", 64): [0, 0]})
    code = mixkv_main(
        [
            "leaderboard",
            f"A={tmp_path / 'a.csv'}",
            "--out",
            str(tmp_path / "lb"),
            "--exclude",
            "kvzip",
            "--no-plots",
        ]
    )
    text = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert code == 0 and "| 64 | 1 | snapkv |" in text and "| kvzip |" not in text
    assert "Left out: kvzip." in text


def test_excluding_a_method_no_grid_holds_is_refused_by_name(tmp_path, capsys):
    _write_grid(tmp_path / "a.csv", {("snapkv", 64): [1, 0]})
    code = mixkv_main(
        ["leaderboard", f"A={tmp_path / 'a.csv'}", "--out", str(tmp_path / "lb"), "--exclude", "kvzp"]
    )
    assert code == 2 and "['kvzp'] to exclude" in capsys.readouterr().err
