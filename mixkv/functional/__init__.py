"""Pure tensor maths of mixkv: scores, budgets and selection (no transformers import)."""

from mixkv.functional.budgets import (
    adaptive_head_budgets,
    allocate_exact,
    group_head_scores,
    head_score_budgets,
    pyramid_budgets,
    running_density_budget,
)
from mixkv.functional.merging import pivot_merge
from mixkv.functional.scores import (
    expected_attention,
    future_rotary,
    head_redundancy,
    key_diversity,
    key_norm_scores,
    last_query_attention,
    leading_real_positions,
    mix_scores,
    mixkv_mix,
    mixkv_scores,
    pool_scores,
    post_vision_attention,
    post_vision_rows,
    unrotate_queries,
    value_norm_importance,
    window_attention,
    window_importance,
)
from mixkv.functional.selection import select_top_per_head

__all__ = [
    "adaptive_head_budgets",
    "allocate_exact",
    "expected_attention",
    "future_rotary",
    "group_head_scores",
    "head_redundancy",
    "head_score_budgets",
    "key_diversity",
    "key_norm_scores",
    "last_query_attention",
    "leading_real_positions",
    "mix_scores",
    "mixkv_mix",
    "mixkv_scores",
    "pivot_merge",
    "pool_scores",
    "post_vision_attention",
    "post_vision_rows",
    "pyramid_budgets",
    "running_density_budget",
    "select_top_per_head",
    "unrotate_queries",
    "value_norm_importance",
    "window_attention",
    "window_importance",
]
