"""Tests of the evaluation statistics (bootstrap intervals, paired comparison, sign test) and of the
Markdown pieces built on them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixkv.eval.reporting import write_markdown_table
from mixkv.eval.stats import (
    bootstrap_ci,
    paired_comparison,
    sign_test_p_value,
    stratified_bootstrap_ci,
)
from mixkv.eval.stats_tables import format_average, format_score, mixkv_base_pairs, paired_lines

# --------------------------------------------------------------------------------------------
# Sign test


def _two_sided_binomial_p(wins: int, losses: int) -> float:
    """Independent reference: double the smaller tail of Binomial(wins + losses, 1/2)."""
    m = wins + losses
    smaller = min(wins, losses)
    tail = sum(math.comb(m, k) * 0.5**m for k in range(smaller + 1))
    return min(1.0, 2.0 * tail)


def test_sign_test_three_wins_twelve_losses_gives_p_0_035():
    p = sign_test_p_value(3, 12)
    assert p == pytest.approx(_two_sided_binomial_p(3, 12), rel=1e-12)
    assert round(p, 4) == 0.0352


@pytest.mark.parametrize(("wins", "losses"), [(0, 6), (1, 9), (7, 7), (20, 31), (0, 1)])
def test_sign_test_matches_the_binomial_tail_and_is_symmetric(wins, losses):
    expected = _two_sided_binomial_p(wins, losses)
    assert sign_test_p_value(wins, losses) == pytest.approx(expected, rel=1e-12)
    assert sign_test_p_value(losses, wins) == sign_test_p_value(wins, losses)


def test_sign_test_without_discordant_examples_is_one():
    assert sign_test_p_value(0, 0) == 1.0


def test_sign_test_rejects_negative_counts():
    with pytest.raises(ValueError, match="non-negative"):
        sign_test_p_value(-1, 3)


# --------------------------------------------------------------------------------------------
# Bootstrap


def test_constant_scores_give_a_zero_width_interval_at_their_value():
    assert bootstrap_ci([0.25] * 40) == (0.25, 0.25, 0.25)


def test_a_single_example_gives_a_degenerate_interval_not_nan():
    assert bootstrap_ci([1.0]) == (1.0, 1.0, 1.0)


def test_large_bernoulli_sample_interval_is_close_to_the_normal_approximation():
    n = 2000
    scores = (np.random.default_rng(1).random(n) < 0.3).astype(float)
    mean, low, high = bootstrap_ci(scores)
    half = 1.96 * math.sqrt(mean * (1 - mean) / n)
    assert mean == pytest.approx(scores.mean())
    assert low == pytest.approx(mean - half, abs=0.1 * half)
    assert high == pytest.approx(mean + half, abs=0.1 * half)


def test_bootstrap_is_deterministic_for_a_seed_and_varies_with_it():
    scores = np.random.default_rng(2).random(30)
    assert bootstrap_ci(scores, seed=5) == bootstrap_ci(scores, seed=5)
    assert bootstrap_ci(scores, seed=5) != bootstrap_ci(scores, seed=6)


def test_higher_confidence_gives_a_wider_interval():
    scores = np.random.default_rng(3).random(50)
    _, low95, high95 = bootstrap_ci(scores, confidence=0.95)
    _, low99, high99 = bootstrap_ci(scores, confidence=0.99)
    assert low99 < low95 < high95 < high99


@pytest.mark.parametrize(
    ("scores", "kwargs", "match"),
    [
        ([], {}, "non-empty"),
        ([0.5, float("nan")], {}, "NaN"),
        ([0.5, 1.0], {"confidence": 1.0}, "confidence"),
        ([0.5, 1.0], {"resamples": 0}, "resamples"),
    ],
)
def test_bootstrap_rejects_bad_input(scores, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(scores, **kwargs)


def test_stratified_bootstrap_of_one_group_is_the_plain_bootstrap():
    scores = np.random.default_rng(4).random(25)
    assert stratified_bootstrap_ci([scores]) == bootstrap_ci(scores)


def test_stratified_bootstrap_averages_group_means_each_counting_once():
    groups = [[1.0, 1.0, 0.0, 1.0], [0.0, 1.0]]
    mean, low, high = stratified_bootstrap_ci(groups)
    assert mean == pytest.approx((0.75 + 0.5) / 2)
    assert low < mean < high


# --------------------------------------------------------------------------------------------
# Paired comparison


def test_constant_differences_give_a_zero_width_significant_interval():
    a = np.random.default_rng(5).random(20)
    result = paired_comparison(a, a + 0.25)
    assert (result.difference, result.ci_low, result.ci_high) == pytest.approx((0.25, 0.25, 0.25))
    assert result.ci_low == result.ci_high
    assert result.significant
    assert (result.wins, result.ties, result.losses) == (20, 0, 0)


def test_paired_counts_and_p_value_leave_ties_out():
    a = [1.0] * 12 + [0.0] * 3 + [1.0] * 5
    b = [0.0] * 12 + [1.0] * 3 + [1.0] * 5
    result = paired_comparison(a, b)
    assert (result.n, result.wins, result.ties, result.losses) == (20, 3, 5, 12)
    assert result.p_value == pytest.approx(_two_sided_binomial_p(3, 12))
    assert (result.mean_a, result.mean_b) == pytest.approx((17 / 20, 8 / 20))
    assert result.difference == pytest.approx(result.mean_b - result.mean_a)


def test_pairing_makes_a_consistent_small_gain_significant_where_separate_intervals_overlap():
    a = np.random.default_rng(6).random(40)
    b = a + np.random.default_rng(7).uniform(0.0, 0.04, size=40)
    result = paired_comparison(a, b)
    _, _, high_a = bootstrap_ci(a)
    _, low_b, _ = bootstrap_ci(b)
    assert low_b < high_a  # unpaired intervals overlap...
    assert result.significant and result.ci_low > 0  # ...the paired one excludes 0


def test_a_difference_whose_interval_includes_zero_is_not_significant():
    result = paired_comparison([1.0, 0.0, 1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    assert result.ci_low <= 0 <= result.ci_high
    assert not result.significant
    assert result.p_value == 1.0


def test_paired_comparison_needs_equal_lengths():
    with pytest.raises(ValueError, match="same examples"):
        paired_comparison([1.0, 0.0], [1.0])


# --------------------------------------------------------------------------------------------
# Markdown pieces


def _cell(method, budget, task, length, scores, ids=None):
    ids = ids or [f"sha{i}" for i in range(len(scores))]
    return {
        "cell": {"method": method, "budget": budget, "task": task, "context_length": length},
        "score": sum(scores) / len(scores),
        "examples": [{"score": s, "context_sha1": i} for s, i in zip(scores, ids, strict=True)],
    }


def _index(*cells):
    return {
        (c["cell"]["method"], c["cell"]["budget"], c["cell"]["task"], c["cell"]["context_length"]): c
        for c in cells
    }


def test_a_cell_is_shown_as_its_mean_and_interval_in_percent():
    scores = [1.0, 0.0, 1.0, 1.0, 0.5]
    mean, low, high = bootstrap_ci(scores)
    expected = f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    assert format_score(_cell("snapkv", 64, "t", 1024, scores)) == expected


def test_a_corpus_level_cell_is_shown_without_interval_and_marked():
    cell = _cell("snapkv", 64, "textcaps", None, [0.2, 0.4])
    cell["score"] = 1.3  # e.g. corpus CIDEr-D, not the mean of its examples
    assert format_score(cell) == "130.0†"
    assert format_average([cell, _cell("snapkv", 64, "t", None, [1.0])]).endswith("†")


def test_average_over_tasks_uses_the_stratified_interval():
    cells = [_cell("snapkv", 64, "a", 1024, [1.0, 0.0, 1.0]), _cell("snapkv", 64, "b", 1024, [0.0, 1.0])]
    mean, low, high = stratified_bootstrap_ci([[1.0, 0.0, 1.0], [0.0, 1.0]])
    assert format_average(cells) == f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _grid_cells(tasks):
    scores = {64: [1.0, 0.0, 0.0], 128: [1.0, 1.0, 0.0]}
    cells = [_cell("full", None, t, 1024, [1.0, 1.0, 0.0]) for t in tasks]
    cells += [_cell("snapkv", b, t, 1024, s[: 2 + i]) for b, s in scores.items() for i, t in enumerate(tasks)]
    for c in cells:  # the KV / timing table reads these
        for e in c["examples"]:
            e.update(kv_fraction=0.5, prefill_seconds=1.0, decode_seconds=1.0)
    return cells


def test_several_tasks_get_a_method_by_budget_table_of_their_averages(tmp_path):
    cells = _grid_cells(["a", "b"])
    grid = {
        "methods": ["full", "snapkv"],
        "budgets": [64, 128],
        "tasks": ["a", "b"],
        "context_lengths": [1024],
    }
    table = write_markdown_table(cells, tmp_path / "results.md", **grid).read_text()
    summary = table.split("## Context length 1024 tokens: average over the 2 tasks")[1]
    by_key = _index(*cells)
    snapkv = [format_average([by_key["snapkv", b, t, 1024] for t in "ab"]) for b in (64, 128)]
    assert "| method | 64 | 128 |" in summary
    assert f"| snapkv | {snapkv[0]} | {snapkv[1]} |" in summary
    full = format_average([by_key["full", None, t, 1024] for t in "ab"])
    assert f"| full | {full} | {full} |" in summary


def test_one_task_gets_no_table_of_averages(tmp_path):
    grid = {"methods": ["full", "snapkv"], "budgets": [64, 128], "tasks": ["a"], "context_lengths": [1024]}
    table = write_markdown_table(_grid_cells(["a"]), tmp_path / "results.md", **grid).read_text()
    assert "average over" not in table


def test_mixkv_methods_pair_with_their_bases_when_both_are_run():
    methods = ["full", "snapkv", "mixkv-snapkv", "mixkv-adakv"]
    assert mixkv_base_pairs(methods) == [("snapkv", "mixkv-snapkv")]


def _row(lines, prefix):
    return next(line for line in lines if line.startswith(prefix))


def test_paired_table_bolds_a_difference_only_when_its_interval_excludes_zero():
    base = [0.0] * 20 + [1.0] * 20
    index = _index(
        _cell("snapkv", 64, "t", 1024, base),
        _cell("mixkv-snapkv", 64, "t", 1024, [1.0] * 40),  # +50 points: wins every example snapkv lost
        _cell("snapkv", 128, "t", 1024, base),
        _cell("mixkv-snapkv", 128, "t", 1024, [1.0, *base[1:]]),  # +2.5 points: one example won
    )
    lines = paired_lines(index, [("snapkv", "mixkv-snapkv")], [64, 128], ["t"], [1024])
    clear = paired_comparison(base, [1.0] * 40)
    noise = paired_comparison(base, [1.0, *base[1:]])
    assert clear.significant and not noise.significant
    row64 = _row(lines, "| snapkv | mixkv-snapkv | 64 |")
    row128 = _row(lines, "| snapkv | mixkv-snapkv | 128 |")
    assert (
        f"**{100 * clear.difference:+.1f} [{100 * clear.ci_low:+.1f}, {100 * clear.ci_high:+.1f}]**" in row64
    )
    assert "**" not in row128
    assert f"| 40 | 50.0 | 52.5 | {100 * noise.difference:+.1f} [" in row128
    assert f"| 1 / 39 / 0 | {noise.p_value:.3f} |" in row128


def test_paired_table_pools_cells_and_adds_a_per_cell_table():
    index = _index(
        _cell("snapkv", 64, "a", 1024, [1.0, 0.0, 0.0]),
        _cell("keydiff", 64, "a", 1024, [1.0, 1.0, 0.0]),
        _cell("snapkv", 64, "b", 2048, [0.0, 0.0]),
        _cell("keydiff", 64, "b", 2048, [1.0, 0.0]),
    )
    lines = paired_lines(index, [("snapkv", "keydiff")], [64], ["a", "b"], [1024, 2048])
    pooled = paired_comparison([1.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0, 0.0])
    assert _row(lines, "| snapkv | keydiff | 64 | 2 | 5 | 20.0 | 60.0 |").endswith(
        f"| 2 / 3 / 0 | {pooled.p_value:.3f} |"
    )
    assert any(line.startswith("| snapkv | keydiff | 64 | a | 1024 | 3 |") for line in lines)
    assert any(line.startswith("| snapkv | keydiff | 64 | b | 2048 | 2 |") for line in lines)


def test_the_full_cache_pairs_with_every_budget():
    index = _index(
        _cell("full", None, "t", 1024, [1.0, 1.0]),
        _cell("snapkv", 64, "t", 1024, [0.0, 1.0]),
        _cell("snapkv", 128, "t", 1024, [1.0, 1.0]),
    )
    lines = paired_lines(index, [("full", "snapkv")], [64, 128], ["t"], [1024])
    assert _row(lines, "| full | snapkv | 64 |").startswith("| full | snapkv | 64 | 1 | 2 | 100.0 | 50.0 |")
    assert _row(lines, "| full | snapkv | 128 |").startswith(
        "| full | snapkv | 128 | 1 | 2 | 100.0 | 100.0 |"
    )


def test_two_unbudgeted_methods_pair_once_not_once_per_budget():
    index = _index(
        _cell("closed-book", None, "t", 1024, [0.0, 1.0]),
        _cell("full", None, "t", 1024, [1.0, 1.0]),
    )
    lines = paired_lines(index, [("closed-book", "full")], [64, 128], ["t"], [1024])
    rows = [line for line in lines if line.startswith("| closed-book | full |")]
    assert rows == [_row(lines, "| closed-book | full | - | 1 | 2 | 50.0 | 100.0 |")]


def test_pairing_cells_of_different_examples_raises():
    index = _index(
        _cell("snapkv", 64, "t", 1024, [1.0, 0.0], ids=["x", "y"]),
        _cell("keydiff", 64, "t", 1024, [1.0, 0.0], ids=["x", "z"]),
    )
    with pytest.raises(ValueError, match="example 1 differs"):
        paired_lines(index, [("snapkv", "keydiff")], [64], ["t"], [1024])


def test_pairing_cells_with_different_example_counts_raises():
    index = _index(_cell("snapkv", 64, "t", 1024, [1.0, 0.0]), _cell("keydiff", 64, "t", 1024, [1.0]))
    with pytest.raises(ValueError, match="2 and 1 examples"):
        paired_lines(index, [("snapkv", "keydiff")], [64], ["t"], [1024])


def test_a_cell_of_a_run_in_progress_pairs_on_the_examples_both_cells_have():
    unfinished = {**_cell("mixkv-snapkv", 64, "t", 1024, [1.0, 1.0]), "complete": False}
    index = _index(_cell("snapkv", 64, "t", 1024, [0.0, 1.0, 0.0]), unfinished)
    lines = paired_lines(index, [("snapkv", "mixkv-snapkv")], [64], ["t"], [1024])
    assert _row(lines, "| snapkv | mixkv-snapkv | 64 |").startswith(
        "| snapkv | mixkv-snapkv | 64 | 1 | 2 | 50.0 | 100.0 |"
    )


def test_no_common_cell_gives_no_paired_table():
    index = _index(_cell("snapkv", 64, "t", 1024, [1.0]))
    assert paired_lines(index, [("snapkv", "keydiff")], [64], ["t"], [1024]) == []


@pytest.mark.parametrize("module", ["mixkv.eval.stats", "mixkv.eval.stats_tables"])
def test_statistics_modules_import_neither_torch_nor_transformers(module):
    import ast
    import importlib
    from pathlib import Path

    tree = ast.parse(Path(str(importlib.import_module(module).__file__)).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m.split(".")[0] for m in imported} & {"torch", "transformers"}
