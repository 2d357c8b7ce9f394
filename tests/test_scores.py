"""Specification of the per-position scores in ``mixkv.functional.scores`` (spec sections 1 to 3)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from mixkv.functional import (
    head_redundancy,
    key_diversity,
    key_norm_scores,
    mix_scores,
    mixkv_scores,
    pool_scores,
    value_norm_importance,
    window_attention,
    window_importance,
)

F64 = torch.float64


def worked_example() -> tuple[Tensor, Tensor, Tensor]:
    """Spec section 8: Hkv=1, H=2, N=6, W=2, d=2, float64; returns queries, keys, values."""
    keys = torch.tensor([[1, 0], [0, 1], [1, 1], [2, -1], [1, 0.5], [3, 0]], dtype=F64)[None, None]
    values = torch.tensor([[1, 0], [0, 2], [3, 0], [0, 4], [1, 1], [1, 1]], dtype=F64)[None, None]
    queries = torch.tensor([[[1, 0], [0, 1]], [[2, 0], [1, 1]]], dtype=F64)[None]
    return queries, keys, values


EXAMPLE_ATTENTION = [0.134280, 0.117840, 0.190843, 0.270740]
EXAMPLE_IMPORTANCE = [0.084040, 0.147655, 0.193141, 0.153861]
EXAMPLE_IMPORTANCE_MEAN = 0.144674
EXAMPLE_DIVERSITY = [0.000000, 0.390145, 0.015351, 0.173202]
EXAMPLE_VALUE_TERM = [0.000000, 0.096450, 0.192899, 0.289349]
EXAMPLE_REDUNDANCY = 0.570929
EXAMPLE_MIXED = [0.036059, 0.327483, 0.174403, 0.289055]


def top_set(scores: Tensor, count: int) -> set[int]:
    """Positions of the ``count`` largest entries of a 1-D tensor (brute force)."""
    ranked = sorted(range(scores.numel()), key=lambda j: -float(scores[j]))
    return set(ranked[:count])


def random_inputs(
    seed: int,
    batch: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seq_len: int = 12,
    window: int = 3,
    dim: int = 8,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random float64 queries ``(B, H, W, D)``, keys and values ``(B, Hkv, N, D)``."""
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, heads, window, dim, generator=generator, dtype=F64)
    keys = torch.randn(batch, kv_heads, seq_len, dim, generator=generator, dtype=F64)
    values = torch.randn(batch, kv_heads, seq_len, dim, generator=generator, dtype=F64)
    return queries, keys, values


# --- the worked example of spec section 8 -------------------------------------------------------


def test_worked_example_window_attention_is_the_gqa_mean_of_the_table() -> None:
    queries, keys, _ = worked_example()
    attention = window_attention(queries, keys)
    assert attention.dtype == F64
    torch.testing.assert_close(attention[0, 0], torch.tensor(EXAMPLE_ATTENTION, dtype=F64), atol=1e-6, rtol=0)


def test_worked_example_importance_with_kernel_3() -> None:
    queries, keys, _ = worked_example()
    importance = window_importance(queries, keys, kernel_size=3)
    torch.testing.assert_close(
        importance[0, 0], torch.tensor(EXAMPLE_IMPORTANCE, dtype=F64), atol=1e-6, rtol=0
    )
    assert importance.mean().item() == pytest.approx(EXAMPLE_IMPORTANCE_MEAN, abs=1e-6)


def example_importance_mean() -> Tensor:
    """Unrounded mean of ``I`` of the worked example, ``(1, 1)``."""
    queries, keys, _ = worked_example()
    return window_importance(queries, keys, kernel_size=3).mean(-1)


def test_worked_example_diversity() -> None:
    _, keys, _ = worked_example()
    target = example_importance_mean()
    diversity = key_diversity(keys, 2, target)
    torch.testing.assert_close(diversity[0, 0], torch.tensor(EXAMPLE_DIVERSITY, dtype=F64), atol=1e-6, rtol=0)


def test_worked_example_value_norm_term() -> None:
    _, _, values = worked_example()
    target = example_importance_mean()
    term = value_norm_importance(values, 2, target)
    torch.testing.assert_close(term[0, 0], torch.tensor(EXAMPLE_VALUE_TERM, dtype=F64), atol=1e-6, rtol=0)


def test_worked_example_online_redundancy() -> None:
    _, keys, _ = worked_example()
    assert head_redundancy(keys).item() == pytest.approx(EXAMPLE_REDUNDANCY, abs=1e-6)


def test_worked_example_mixed_score() -> None:
    queries, keys, values = worked_example()
    mixed = mixkv_scores(queries, keys, values, window_size=2, kernel_size=3)
    assert mixed.dtype == F64
    torch.testing.assert_close(mixed[0, 0], torch.tensor(EXAMPLE_MIXED, dtype=F64), atol=1e-6, rtol=0)


def test_worked_example_kept_sets() -> None:
    queries, keys, values = worked_example()
    snapkv = window_importance(queries, keys, kernel_size=3)[0, 0]
    mixkv = mixkv_scores(queries, keys, values, window_size=2, kernel_size=3)[0, 0]
    diversity = key_diversity(keys, 2)[0, 0]
    assert top_set(snapkv, 2) == {2, 3}
    assert top_set(mixkv, 2) == {1, 3}
    assert top_set(diversity, 2) == {1, 3}


# --- invariants ---------------------------------------------------------------------------------


def test_rescaled_terms_share_the_importance_mean_per_head() -> None:
    queries, keys, values = random_inputs(seed=0)
    importance = window_importance(queries, keys)
    target = importance.mean(-1)
    diversity = key_diversity(keys, 3, target)
    value_term = value_norm_importance(values, 3, target)
    torch.testing.assert_close(diversity.mean(-1), target, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(value_term.mean(-1), target, atol=1e-7, rtol=1e-6)


def test_zero_redundancy_ranks_by_importance_plus_value_norm() -> None:
    queries, keys, values = random_inputs(seed=1)
    mixed = mixkv_scores(queries, keys, values, window_size=3, redundancy=torch.zeros(2, dtype=F64))
    importance = window_importance(queries, keys)
    expected = importance + value_norm_importance(values, 3, importance.mean(-1))
    torch.testing.assert_close(mixed, expected)


def test_full_redundancy_ranks_by_diversity() -> None:
    queries, keys, values = random_inputs(seed=2)
    mixed = mixkv_scores(queries, keys, values, window_size=3, redundancy=torch.ones(2, 2, dtype=F64))
    expected = key_diversity(keys, 3, window_importance(queries, keys).mean(-1))
    torch.testing.assert_close(mixed, expected)


def test_diversity_without_target_is_min_max_normalised() -> None:
    _, keys, _ = random_inputs(seed=3)
    diversity = key_diversity(keys, 3)
    assert torch.allclose(diversity.amin(-1), torch.zeros(2, 2, dtype=F64))
    assert torch.allclose(diversity.amax(-1), torch.ones(2, 2, dtype=F64), atol=1e-6)


def test_constant_value_norms_give_a_zero_term() -> None:
    generator = torch.Generator().manual_seed(4)
    directions = torch.nn.functional.normalize(torch.randn(1, 2, 10, 4, generator=generator), dim=-1)
    term = value_norm_importance(3.0 * directions, 2, torch.ones(1, 2))
    assert torch.equal(term, torch.zeros(1, 2, 8))


def test_identical_keys_have_redundancy_one() -> None:
    keys = torch.tensor([0.3, -1.2, 0.7, 2.0]).expand(1, 2, 9, 4).clone()
    assert torch.allclose(head_redundancy(keys), torch.ones(1, 2))


def test_parallel_keys_have_zero_diversity_not_rounding_noise() -> None:
    direction = torch.tensor([0.3, -1.2, 0.7, 2.0])
    lengths = torch.linspace(0.5, 3.0, 9)[:, None]
    keys = (lengths * direction).expand(1, 2, 9, 4).clone()
    assert torch.equal(key_diversity(keys, 3, torch.ones(1, 2)), torch.zeros(1, 2, 6))


def test_redundancy_equals_brute_force_mean_pairwise_cosine() -> None:
    _, keys, _ = random_inputs(seed=5, seq_len=7)
    keys = keys + 0.8  # shift so that the mean cosine is clearly positive
    redundancy = head_redundancy(keys)
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            cosines = [
                torch.nn.functional.cosine_similarity(keys[b, h, i], keys[b, h, j], dim=0).item()
                for i in range(7)
                for j in range(7)
                if i != j
            ]
            expected = min(max(sum(cosines) / len(cosines), 0.0), 1.0)
            assert redundancy[b, h].item() == pytest.approx(expected, abs=1e-10)


def test_redundancy_is_clipped_at_zero_for_opposed_keys() -> None:
    keys = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])[None, None]
    assert head_redundancy(keys).item() == 0.0


def test_redundancy_of_a_single_real_key_is_zero() -> None:
    keys = torch.randn(1, 1, 4, 3, generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[False, False, False, True]])
    assert head_redundancy(keys, key_mask=mask).item() == 0.0


def test_window_attention_matches_a_brute_force_gqa_loop() -> None:
    batch, heads, kv_heads, window, seq_len, dim, scaling = 2, 6, 2, 3, 8, 4, 0.37
    queries, keys, _ = random_inputs(
        seed=7, batch=batch, heads=heads, kv_heads=kv_heads, seq_len=seq_len, dim=dim
    )
    group = heads // kv_heads
    expected = torch.zeros(batch, kv_heads, seq_len - window, dtype=F64)
    for b in range(batch):
        for head in range(heads):
            for t in range(window):
                visible = seq_len - window + t + 1  # causal inside the window
                logits = [
                    scaling * float(queries[b, head, t] @ keys[b, head // group, j]) for j in range(visible)
                ]
                total = sum(math.exp(x) for x in logits)
                for j in range(seq_len - window):
                    expected[b, head // group, j] += math.exp(logits[j]) / total / (window * group)
    torch.testing.assert_close(window_attention(queries, keys, scaling=scaling), expected)


def test_default_scaling_is_one_over_sqrt_head_dim() -> None:
    queries, keys, _ = random_inputs(seed=8)
    torch.testing.assert_close(
        window_attention(queries, keys), window_attention(queries, keys, scaling=8**-0.5)
    )


def test_low_precision_inputs_are_scored_in_float32() -> None:
    queries, keys, values = (t.to(torch.bfloat16) for t in random_inputs(seed=9))
    assert mixkv_scores(queries, keys, values, window_size=3).dtype == torch.float32


# --- padding ------------------------------------------------------------------------------------


SCORERS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]] = {
    "window_importance": lambda q, k, v, m: window_importance(q, k, key_mask=m),
    "window_importance_max": lambda q, k, v, m: window_importance(q, k, pooling="max", key_mask=m),
    "value_norm_importance": lambda q, k, v, m: value_norm_importance(
        v, 3, torch.ones(k.shape[:2], dtype=F64), key_mask=m
    ),
    "key_diversity": lambda q, k, v, m: key_diversity(k, 3, key_mask=m),
    "key_norm_scores": lambda q, k, v, m: key_norm_scores(k, 3, key_mask=m),
    "mixkv_scores": lambda q, k, v, m: mixkv_scores(q, k, v, window_size=3, key_mask=m),
}


def left_padded_pair(
    pads: int,
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """A batch of a full row and a row left-padded with ``pads`` garbage positions, and that row alone."""
    full_q, full_k, full_v = random_inputs(seed=10, batch=1, seq_len=12)
    row_q, row_k, row_v = random_inputs(seed=11, batch=1, seq_len=12 - pads)
    garbage = 50 * torch.randn(1, 2, pads, 8, generator=torch.Generator().manual_seed(12), dtype=F64)
    keys = torch.cat([full_k, torch.cat([garbage, row_k], dim=2)])
    values = torch.cat([full_v, torch.cat([-garbage, row_v], dim=2)])
    queries = torch.cat([full_q, row_q])
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :pads] = False
    return (queries, keys, values, mask), (row_q, row_k, row_v)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_left_padded_row_scores_like_the_row_alone(name: str) -> None:
    scorer, pads = SCORERS[name], 4
    (queries, keys, values, mask), (row_q, row_k, row_v) = left_padded_pair(pads)
    batched = scorer(queries, keys, values, mask)
    torch.testing.assert_close(batched[1:, :, pads:], scorer(row_q, row_k, row_v, None))


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_padded_positions_score_minus_infinity(name: str) -> None:
    (queries, keys, values, mask), _ = left_padded_pair(pads=4)
    scores = SCORERS[name](queries, keys, values, mask)
    assert torch.isneginf(scores[1, :, :4]).all()
    assert torch.isfinite(scores[1, :, 4:]).all()
    assert torch.isfinite(scores[0]).all()


def test_padding_is_left_out_of_redundancy() -> None:
    (_, keys, _, mask), (_, row_k, _) = left_padded_pair(pads=4)
    torch.testing.assert_close(head_redundancy(keys, key_mask=mask)[1:], head_redundancy(row_k))


def test_window_attention_is_zero_at_padding() -> None:
    (queries, keys, _, mask), _ = left_padded_pair(pads=4)
    assert torch.equal(window_attention(queries, keys, key_mask=mask)[1, :, :4], torch.zeros(2, 4, dtype=F64))


def test_integer_key_mask_is_accepted_like_a_bool_mask() -> None:
    (queries, keys, values, mask), _ = left_padded_pair(pads=4)
    torch.testing.assert_close(
        mixkv_scores(queries, keys, values, window_size=3, key_mask=mask.long()),
        mixkv_scores(queries, keys, values, window_size=3, key_mask=mask),
    )


# --- pooling ------------------------------------------------------------------------------------


def test_average_pooling_counts_the_zero_padding() -> None:
    scores = torch.tensor([3.0, 6.0, 9.0, 3.0])
    expected = torch.tensor([9.0 / 3, 18.0 / 3, 18.0 / 3, 12.0 / 3])
    torch.testing.assert_close(pool_scores(scores, kernel_size=3), expected)


def test_max_pooling_takes_the_window_maximum() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0, 5.0, 4.0]])
    expected = torch.tensor([[3.0, 3.0, 3.0, 5.0, 5.0, 5.0]])
    torch.testing.assert_close(pool_scores(scores, kernel_size=3, pooling="max"), expected)


def test_max_pooling_pads_with_zeros() -> None:
    scores = torch.tensor([-1.0, -2.0, -3.0])
    torch.testing.assert_close(
        pool_scores(scores, kernel_size=3, pooling="max"), torch.tensor([0.0, -1.0, 0.0])
    )


def test_kernel_size_one_leaves_scores_unchanged() -> None:
    scores = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(13))
    torch.testing.assert_close(pool_scores(scores, kernel_size=1), scores)


def test_window_importance_max_option_pools_the_attention_with_max() -> None:
    queries, keys, _ = random_inputs(seed=14)
    expected = pool_scores(window_attention(queries, keys), kernel_size=5, pooling="max")
    torch.testing.assert_close(window_importance(queries, keys, pooling="max"), expected)


# --- mixing and Knorm ---------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0.0, 0.4, 1.0])
def test_mix_is_minus_infinity_where_an_input_is_and_never_nan(weight: float) -> None:
    importance = torch.tensor([[[1.0, -math.inf, 2.0, 0.5]]])
    diversity = torch.tensor([[[0.2, 0.3, -math.inf, 0.1]]])
    mixed = mix_scores(importance, diversity, torch.tensor([[weight]]))
    expected = torch.tensor(
        [[[weight * 0.2 + (1 - weight) * 1.0, -math.inf, -math.inf, weight * 0.1 + (1 - weight) * 0.5]]]
    )
    torch.testing.assert_close(mixed, expected)


def test_mix_weights_each_head_by_its_redundancy() -> None:
    importance = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    diversity = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    mixed = mix_scores(importance, diversity, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(mixed, torch.tensor([[[0.75, 0.25], [0.25, 0.75]]]))


def test_key_norm_scores_are_negated_prefix_key_norms() -> None:
    keys = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [1.0, 1.0]])[None, None]
    torch.testing.assert_close(key_norm_scores(keys, 1), torch.tensor([[[-5.0, -1.0, -10.0]]]))


# --- validation ---------------------------------------------------------------------------------


Q, K, V = random_inputs(seed=15)  # queries (2, 4, 3, 8); keys and values (2, 2, 12, 8)
TARGET = torch.ones(2, 2, dtype=F64)

VALUE_ERRORS: dict[str, tuple[Callable[[], object], str]] = {
    "queries_ndim": (lambda: window_attention(Q[0], K), "queries must have shape"),
    "keys_ndim": (lambda: window_attention(Q, K[0]), "keys must have shape"),
    "batch_mismatch": (lambda: window_attention(Q[:1], K), "batch size"),
    "head_dim_mismatch": (lambda: window_attention(Q[..., :4], K), "head_dim"),
    "heads_not_multiple": (lambda: window_attention(Q[:, :3], K), "multiple of the number of KV heads"),
    "window_covers_sequence": (lambda: window_attention(Q, K[:, :, :3]), "smaller than the sequence length"),
    "window_size_zero": (lambda: key_diversity(K, 0), "at least 1"),
    "window_size_too_large": (lambda: key_norm_scores(K, 12), "smaller than the sequence length"),
    "key_mask_shape": (
        lambda: window_importance(Q, K, key_mask=torch.ones(2, 11, dtype=torch.bool)),
        "key_mask must have shape",
    ),
    "scaling_not_positive": (lambda: window_attention(Q, K, scaling=0.0), "scaling must be positive"),
    "kernel_even": (lambda: pool_scores(TARGET, kernel_size=4), "odd"),
    "kernel_zero": (lambda: window_importance(Q, K, kernel_size=0), "odd"),
    "pooling_unknown": (lambda: pool_scores(TARGET, pooling="min"), "pooling must be one of"),
    "target_mean_shape": (lambda: value_norm_importance(V, 3, TARGET[0]), "target_mean must have shape"),
    "window_size_differs_from_queries": (
        lambda: mixkv_scores(Q, K, V, window_size=4),
        "must equal queries.shape",
    ),
    "values_shape": (lambda: mixkv_scores(Q, K, V[:, :, :11], window_size=3), "values must have shape"),
    "redundancy_shape": (
        lambda: mixkv_scores(Q, K, V, window_size=3, redundancy=torch.ones(3)),
        r"redundancy must have shape \(num_kv_heads,\)",
    ),
    "redundancy_range": (
        lambda: mixkv_scores(Q, K, V, window_size=3, redundancy=torch.tensor([0.5, 1.5])),
        r"\[0, 1\]",
    ),
    "mix_shape_mismatch": (
        lambda: mix_scores(torch.zeros(2, 2, 3), torch.zeros(2, 2, 4), TARGET),
        "same shape",
    ),
}


@pytest.mark.parametrize("case", sorted(VALUE_ERRORS))
def test_invalid_arguments_raise_value_error(case: str) -> None:
    call, message = VALUE_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        call()


TYPE_ERRORS: dict[str, Callable[[], object]] = {
    "integer_keys": lambda: key_norm_scores(K.long(), 3),
    "integer_queries": lambda: window_attention(Q.long(), K),
    "integer_values": lambda: mixkv_scores(Q, K, V.long(), window_size=3),
    "float_key_mask": lambda: head_redundancy(K, key_mask=torch.ones(2, 12)),
    "float_window_size": lambda: key_diversity(K, 3.0),  # type: ignore[arg-type]
    "integer_scores_to_pool": lambda: pool_scores(torch.ones(5, dtype=torch.long)),
}


@pytest.mark.parametrize("case", sorted(TYPE_ERRORS))
def test_non_floating_or_non_integer_arguments_raise_type_error(case: str) -> None:
    with pytest.raises(TypeError):
        TYPE_ERRORS[case]()


def test_mixkv_scores_with_precomputed_importance_equal_the_self_contained_ones():
    g = torch.Generator().manual_seed(11)
    queries, keys, values = (
        torch.randn(2, 4, 6, 8, generator=g),
        torch.randn(2, 2, 30, 8, generator=g),
        torch.randn(2, 2, 30, 8, generator=g),
    )
    importance = window_importance(queries, keys, kernel_size=3)
    expected = mixkv_scores(queries, keys, values, window_size=6, kernel_size=3)
    assert torch.equal(
        mixkv_scores(queries, keys, values, window_size=6, kernel_size=3, importance=importance), expected
    )
    with pytest.raises(ValueError, match="importance must have shape"):
        mixkv_scores(queries, keys, values, window_size=6, importance=importance[..., 1:])
