"""Specification of the budget policies in ``mixkv.functional.budgets`` (spec section 5)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch

from mixkv.functional import (
    adaptive_head_budgets,
    allocate_exact,
    group_head_scores,
    head_score_budgets,
    pyramid_budgets,
)

# --- allocate_exact -----------------------------------------------------------------------------


def test_allocation_sums_exactly_and_respects_bounds_on_random_inputs() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        size = int(torch.randint(1, 40, (1,), generator=generator))
        ideal = torch.rand(size, generator=generator, dtype=torch.float64) * 50 - 5
        low = torch.randint(0, 5, (size,), generator=generator)
        high = low + torch.randint(0, 30, (size,), generator=generator)
        total = int(torch.randint(int(low.sum()), int(high.sum()) + 1, (1,), generator=generator))
        counts = allocate_exact(ideal, total, minimum=low, maximum=high)
        assert counts.dtype == torch.long
        assert int(counts.sum()) == total
        assert bool((counts >= low).all() and (counts <= high).all())


def test_allocation_within_bounds_stays_within_one_of_an_ideal_with_the_right_sum() -> None:
    generator = torch.Generator().manual_seed(1)
    ideal = torch.rand(25, generator=generator, dtype=torch.float64) * 20
    total = round(float(ideal.sum()))
    ideal = ideal + (total - ideal.sum()) / 25  # now sums exactly to total
    counts = allocate_exact(ideal, total, maximum=100)
    assert int(counts.sum()) == total
    assert bool(((counts - ideal).abs() < 1).all())


def test_allocation_at_the_extreme_totals_gives_every_bound() -> None:
    generator = torch.Generator().manual_seed(7)
    for _ in range(50):
        ideal = torch.rand(30, generator=generator, dtype=torch.float64) * 1000
        low = torch.randint(0, 50, (30,), generator=generator)
        high = low + torch.randint(0, 50, (30,), generator=generator)
        assert torch.equal(allocate_exact(ideal, int(high.sum()), minimum=low, maximum=high), high)
        assert torch.equal(allocate_exact(ideal, int(low.sum()), minimum=low, maximum=high), low)


def test_allocation_gives_missing_units_to_the_largest_remainders() -> None:
    ideal = torch.tensor([1.6, 1.3, 1.1])
    assert allocate_exact(ideal, 4, maximum=10).tolist() == [2, 1, 1]


def test_allocation_breaks_remainder_ties_toward_the_lower_index() -> None:
    assert allocate_exact(torch.tensor([1.5, 1.5]), 3, maximum=10).tolist() == [2, 1]


def test_allocation_spreads_the_excess_of_a_capped_entry_over_the_others() -> None:
    counts = allocate_exact(torch.tensor([10.0, 1.0, 1.0]), 12, maximum=6)
    assert counts.tolist() == [6, 3, 3]


def test_allocation_takes_a_deficit_below_the_minimum_from_the_others() -> None:
    counts = allocate_exact(torch.tensor([0.0, 6.0, 6.0]), 12, minimum=4, maximum=20)
    assert counts.tolist() == [4, 4, 4]


def test_allocation_keeps_the_shape_of_ideal_and_broadcasts_tensor_bounds() -> None:
    ideal = torch.full((2, 3), 5.0)
    counts = allocate_exact(ideal, 24, maximum=torch.tensor([2, 8, 8]))
    assert counts.tolist() == [[2, 5, 5], [2, 5, 5]]


def test_infeasible_totals_raise_value_error() -> None:
    with pytest.raises(ValueError, match="infeasible"):
        allocate_exact(torch.ones(3), 10, maximum=3)
    with pytest.raises(ValueError, match="infeasible"):
        allocate_exact(torch.ones(3), 2, minimum=1, maximum=3)


def test_allocation_rejects_a_minimum_above_its_maximum() -> None:
    with pytest.raises(ValueError, match="minimum must be <= its maximum"):
        allocate_exact(torch.ones(2), 2, minimum=torch.tensor([0, 3]), maximum=2)


def test_allocation_rejects_non_finite_ideals() -> None:
    with pytest.raises(ValueError, match="finite"):
        allocate_exact(torch.tensor([1.0, math.nan]), 2, maximum=2)


def test_allocation_rejects_floating_bounds() -> None:
    with pytest.raises(TypeError, match="integer"):
        allocate_exact(torch.ones(2), 2, maximum=torch.tensor([1.5, 1.5]))


# --- PyramidKV ----------------------------------------------------------------------------------


def test_pyramid_rounds_the_real_linear_schedule_by_hand() -> None:
    # base = 20, lo = 1, hi = 39: ideal 39, 29.5, 20, 10.5, 1; the missing unit goes to layer 1
    assert pyramid_budgets(5, 52, 32, 1000).tolist() == [71, 62, 52, 42, 33]


@pytest.mark.parametrize("num_layers", [28, 32, 64])
def test_pyramid_total_is_exact_where_the_integer_step_drifts(num_layers: int) -> None:
    budgets = pyramid_budgets(num_layers, 64, 32, 4096)
    assert int(budgets.sum()) == num_layers * 64
    assert int(budgets[0]) <= 2 * (64 - 32) + 32  # never the ~2x of a zero integer step


def test_pyramid_totals_and_caps_hold_for_random_configurations() -> None:
    rng = random.Random(2)
    for _ in range(300):
        layers, window = rng.randint(1, 80), rng.randint(1, 64)
        budget = window + rng.randint(1, 512)
        seq_len = window + rng.randint(1, 2048)
        budgets = pyramid_budgets(layers, budget, window, seq_len, beta=rng.choice([2, 20, 50]))
        assert budgets.shape == (layers,)
        assert int(budgets.sum()) == layers * min(budget, seq_len)
        assert bool((budgets <= seq_len).all() and (budgets >= window).all())
        assert bool((budgets[:-1] >= budgets[1:]).all())  # lower layers keep at least as much


def test_pyramid_caps_the_first_layer_at_the_prompt_length_by_hand() -> None:
    # base = 100, prefix = 150: hi = 195 is capped to 150, lo = 50; ideal 150, 116.67, 83.33, 50
    assert pyramid_budgets(4, 132, 32, 182).tolist() == [182, 149, 115, 82]


def test_pyramid_with_one_layer_gives_the_budget() -> None:
    assert pyramid_budgets(1, 64, 32, 500).tolist() == [64]


def test_pyramid_keeps_everything_for_prompts_within_the_budget() -> None:
    assert pyramid_budgets(6, 128, 32, 100).tolist() == [100] * 6


# --- AdaKV --------------------------------------------------------------------------------------


def test_adaptive_budgets_follow_the_global_top_entries_by_hand() -> None:
    # base = 4, floor = 1; head 0 holds the top 6 of the top 8 -> ideal 0.75 * (6, 2) + 1 = (5.5, 2.5)
    importance = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.3, 0.2, 0.1, 0.05, 0.02, 0.01]])
    budgets = adaptive_head_budgets(importance, 6, 2, floor_ratio=0.25, mass_scaling=False)
    assert budgets.tolist() == [8, 4]


def test_mass_scaling_favours_heads_with_concentrated_mass() -> None:
    # head 0 spreads 1.8 over six entries (top-2 share 1/3 -> 0.1 each); head 1 keeps all of its mass
    importance = torch.tensor([[0.3] * 6, [0.2, 0.2, 0.0, 0.0, 0.0, 0.0]])
    unscaled = adaptive_head_budgets(importance, 4, 2, floor_ratio=0.0, mass_scaling=False)
    scaled = adaptive_head_budgets(importance, 4, 2, floor_ratio=0.0, mass_scaling=True)
    assert unscaled.tolist() == [6, 2]
    assert scaled.tolist() == [4, 4]


def test_adaptive_total_is_exact_and_floor_is_respected_on_random_scores() -> None:
    generator = torch.Generator().manual_seed(3)
    for _ in range(100):
        heads = int(torch.randint(1, 9, (1,), generator=generator))
        prefix = int(torch.randint(40, 300, (1,), generator=generator))
        window = int(torch.randint(1, 33, (1,), generator=generator))
        budget = window + int(torch.randint(1, 40, (1,), generator=generator))
        importance = torch.rand(heads, prefix, generator=generator) ** 4
        budgets = adaptive_head_budgets(importance, budget, window)
        floor = int(0.2 * (budget - window))
        assert int(budgets.sum()) == heads * budget
        assert bool((budgets >= floor + window).all())


def test_adaptive_budgets_are_capped_at_the_selectable_positions() -> None:
    importance = torch.rand(3, 20, generator=torch.Generator().manual_seed(4))
    importance[0, :17] = -math.inf  # a heavily padded head: 3 selectable positions
    budgets = adaptive_head_budgets(importance, 12, 2)
    assert int(budgets[0]) <= 3 + 2
    assert int(budgets.sum()) == 3 * 12


def test_adaptive_budgets_keep_everything_when_fewer_positions_are_selectable() -> None:
    importance = torch.rand(2, 5, generator=torch.Generator().manual_seed(5))
    assert adaptive_head_budgets(importance, 40, 8).tolist() == [13, 13]


# --- SparseMM -----------------------------------------------------------------------------------


def test_head_score_budgets_share_the_rest_in_proportion_by_hand() -> None:
    # base = 10, min = 2, remaining = 8 * 2 = 16 -> 2 + 16 * (0.25, 0.75) = (6, 14)
    budgets = head_score_budgets(torch.tensor([[1.0, 3.0]]), 42, 32, 1000, min_ratio=0.2)
    assert budgets.tolist() == [[38, 46]]


def test_head_score_budgets_give_a_capped_head_excess_to_the_others() -> None:
    budgets = head_score_budgets(torch.tensor([[1.0, 3.0]]), 42, 32, 44, min_ratio=0.2)
    assert budgets.tolist() == [[40, 44]]


def test_head_score_budgets_are_exact_and_above_the_minimum_on_random_tables() -> None:
    generator = torch.Generator().manual_seed(6)
    for _ in range(100):
        layers = int(torch.randint(1, 40, (1,), generator=generator))
        heads = int(torch.randint(1, 9, (1,), generator=generator))
        budget = 32 + int(torch.randint(1, 300, (1,), generator=generator))
        seq_len = 32 + int(torch.randint(1, 3000, (1,), generator=generator))
        scores = torch.rand(layers, heads, generator=generator) ** 3
        budgets = head_score_budgets(scores, budget, 32, seq_len)
        base = budget - 32
        assert budgets.shape == (layers, heads)
        assert int(budgets.sum()) == layers * heads * min(budget, seq_len)
        assert bool((budgets <= seq_len).all())
        assert bool((budgets >= min(int(0.1 * base), seq_len - 32) + 32).all())


def test_group_head_scores_normalise_then_sum_each_gqa_group() -> None:
    table = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 5.0]])
    expected = torch.tensor([[3.0, 7.0], [0.0, 10.0]]) / 20
    torch.testing.assert_close(group_head_scores(table, 2), expected)


# --- validation ---------------------------------------------------------------------------------


VALUE_ERRORS: dict[str, tuple[Callable[[], object], str]] = {
    "pyramid_budget_not_above_window": (lambda: pyramid_budgets(4, 32, 32, 100), "budget must be larger"),
    "adaptive_budget_not_above_window": (
        lambda: adaptive_head_budgets(torch.ones(2, 10), 8, 8),
        "budget must be larger",
    ),
    "sparsemm_budget_not_above_window": (
        lambda: head_score_budgets(torch.ones(2, 2), 16, 32, 100),
        "budget must be larger",
    ),
    "window_below_one": (lambda: pyramid_budgets(4, 64, 0, 100), "window_size must be at least 1"),
    "prompt_within_window": (lambda: pyramid_budgets(4, 64, 32, 32), "seq_len"),
    "no_layers": (lambda: pyramid_budgets(0, 64, 32, 100), "num_layers"),
    "beta_not_positive": (lambda: pyramid_budgets(4, 64, 32, 100, beta=0), "beta"),
    "negative_importance": (
        lambda: adaptive_head_budgets(torch.tensor([[0.5, -0.1]]), 4, 2),
        "non-negative",
    ),
    "importance_shape": (lambda: adaptive_head_budgets(torch.ones(2, 3, 4), 4, 2), "shape"),
    "importance_nan": (lambda: adaptive_head_budgets(torch.tensor([[math.nan, 1.0]]), 4, 2), "finite"),
    "floor_ratio_range": (
        lambda: adaptive_head_budgets(torch.ones(2, 5), 4, 2, floor_ratio=1.5),
        "floor_ratio",
    ),
    "negative_head_scores": (
        lambda: head_score_budgets(torch.tensor([[1.0, -1.0]]), 64, 32, 100),
        "non-negative",
    ),
    "zero_head_scores": (lambda: head_score_budgets(torch.zeros(2, 2), 64, 32, 100), "positive sum"),
    "head_scores_shape": (lambda: head_score_budgets(torch.ones(4), 64, 32, 100), "2-D"),
    "min_ratio_range": (
        lambda: head_score_budgets(torch.ones(2, 2), 64, 32, 100, min_ratio=-0.1),
        "min_ratio",
    ),
    "kv_heads_not_divisor": (lambda: group_head_scores(torch.ones(2, 6), 4), "divisor"),
}


@pytest.mark.parametrize("case", sorted(VALUE_ERRORS))
def test_invalid_arguments_raise_value_error(case: str) -> None:
    call, message = VALUE_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        call()
