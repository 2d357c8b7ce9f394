"""Specification of ``mixkv.functional.select_top_per_head`` (spec section 4)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from mixkv.functional import select_top_per_head


def brute_force_top(row: list[float], count: int) -> list[int]:
    """The ``count`` best positions of ``row`` (ties to the lower position), in ascending order."""
    ranked = sorted(range(len(row)), key=lambda j: (-row[j], j))
    return sorted(ranked[:count])


def test_selection_matches_brute_force_on_random_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (3, 4, 15), generator=generator).float()  # many ties
    scores[torch.rand(3, 4, 15, generator=generator) < 0.3] = -math.inf
    selectable = (~torch.isneginf(scores)).sum(-1)
    counts = (torch.rand(3, 4, generator=generator) * (selectable + 1)).long()
    indices, valid = select_top_per_head(scores, counts)
    assert indices.shape == valid.shape == (3, 4, int(counts.max()))
    for b in range(3):
        for h in range(4):
            count = int(counts[b, h])
            assert indices[b, h, :count].tolist() == brute_force_top(scores[b, h].tolist(), count)
            assert valid[b, h].tolist() == [slot < count for slot in range(indices.shape[-1])]


def test_selected_indices_are_in_original_order() -> None:
    scores = torch.tensor([[[0.1, 0.9, 0.3, 0.8, 0.7]]])
    indices, valid = select_top_per_head(scores, torch.tensor([[3]]))
    assert indices.tolist() == [[[1, 3, 4]]]
    assert valid.all()


def test_ties_are_broken_toward_the_lower_position() -> None:
    scores = torch.tensor([[[0.5, 1.0, 1.0, 1.0, 1.0]]])
    indices, _ = select_top_per_head(scores, torch.tensor([[2]]))
    assert indices.tolist() == [[[1, 2]]]


def test_padding_slots_hold_index_zero_and_are_invalid() -> None:
    scores = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]])
    indices, valid = select_top_per_head(scores, torch.tensor([[3, 1]]))
    assert indices.tolist() == [[[1, 2, 3], [0, 0, 0]]]
    assert valid.tolist() == [[[True, True, True], [True, False, False]]]


def test_minus_infinity_is_never_selected() -> None:
    scores = torch.tensor([[[-math.inf, -5.0, -math.inf, -7.0]]])
    indices, _ = select_top_per_head(scores, torch.tensor([[2]]))
    assert indices.tolist() == [[[1, 3]]]


def test_zero_counts_give_an_empty_selection() -> None:
    indices, valid = select_top_per_head(torch.rand(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    assert indices.shape == valid.shape == (2, 3, 0)
    assert indices.dtype == torch.long and valid.dtype == torch.bool


SCORES = torch.tensor([[[0.3, -math.inf, 0.2]]])

VALUE_ERRORS: dict[str, tuple[Callable[[], object], str]] = {
    "negative_count": (lambda: select_top_per_head(SCORES, torch.tensor([[-1]])), "non-negative"),
    "count_above_selectable": (lambda: select_top_per_head(SCORES, torch.tensor([[3]])), "exceeds"),
    "nan_score": (lambda: select_top_per_head(torch.tensor([[[math.nan, 1.0]]]), torch.tensor([[1]])), "NaN"),
    "scores_ndim": (lambda: select_top_per_head(SCORES[0], torch.tensor([[1]])), "scores must have shape"),
    "counts_shape": (lambda: select_top_per_head(SCORES, torch.tensor([1])), "counts must have shape"),
}


@pytest.mark.parametrize("case", sorted(VALUE_ERRORS))
def test_invalid_arguments_raise_value_error(case: str) -> None:
    call, message = VALUE_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_floating_counts_raise_type_error() -> None:
    with pytest.raises(TypeError, match="integer"):
        select_top_per_head(SCORES, torch.tensor([[1.0]]))
