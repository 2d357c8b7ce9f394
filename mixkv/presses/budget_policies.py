"""Importance presses that differ by budget policy: SnapKV, PyramidKV, AdaKV, SparseMM.

All four rank prompt tokens by the SnapKV importance ``I`` (pooled attention from the observation
window); they differ in how many tokens each layer and KV head may keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixkv.functional import adaptive_head_budgets, group_head_scores, head_score_budgets, pyramid_budgets
from mixkv.presses.base import BasePress, ScoringContext


@dataclass
class SnapKVPress(BasePress):
    """SnapKV: keep the prompt tokens the observation window attends to most, same budget everywhere.

    Score: ``I(j) = pool_k(mean_{window, GQA group} softmax(Q_w K^T * scale))(j)``; every layer and
    KV head keeps ``budget`` tokens (window included).

    Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024,
    https://arxiv.org/abs/2404.14469. Defaults: ``window_size=32``, ``kernel_size=5``, average pooling.
    """

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        return ctx.importance


@dataclass
class PyramidKVPress(SnapKVPress):
    """PyramidKV: SnapKV scores, per-layer budgets decreasing linearly with depth.

    Layer ``l`` keeps about ``hi - l (hi - lo) / (L - 1)`` prompt tokens plus the window, with
    ``base = budget - W``, ``lo = base // beta``, ``hi = 2 base - lo`` (``hi`` capped at the prompt
    length). Unlike the public code, budgets are recomputed for every prompt and rounded so the mean
    over layers is exactly the budget.

    Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling", 2024, https://arxiv.org/abs/2406.02069. Default ``beta=20``.
    """

    beta: int = 20

    def head_budgets(self, ctx: ScoringContext) -> torch.Tensor:
        rows = [
            pyramid_budgets(
                len(ctx.compressible_layers), int(budget), ctx.window_size, int(length), beta=self.beta
            )[ctx.layer_rank]
            for budget, length in zip(ctx.budgets.tolist(), ctx.lengths.tolist(), strict=True)
        ]
        per_row = torch.stack(rows).to(ctx.keys.device)
        return per_row.unsqueeze(-1).expand(-1, ctx.keys.shape[1]).clone()


@dataclass
class AdaKVPress(SnapKVPress):
    """AdaKV: SnapKV scores, budgets shared adaptively between the KV heads of each layer.

    The layer's ``Hkv * (budget - W)`` prompt slots go to the heads whose (mass-scaled) importance
    is highest overall; every head keeps at least ``floor_ratio * (budget - W)`` tokens. Totals are
    exact per layer (the public code can be off by rounding).

    Paper: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
    Efficient LLM Inference", 2024, https://arxiv.org/abs/2407.11550. Defaults ``floor_ratio=0.2``,
    ``mass_scaling=True``.
    """

    floor_ratio: float = 0.2
    mass_scaling: bool = True

    def head_budgets(self, ctx: ScoringContext) -> torch.Tensor:
        return adaptive_layer_budgets(
            ctx, ctx.layer_importance(), floor_ratio=self.floor_ratio, mass_scaling=self.mass_scaling
        )


def adaptive_layer_budgets(
    ctx: ScoringContext, layer_scores: torch.Tensor, *, floor_ratio: float, mass_scaling: bool
) -> torch.Tensor:
    """This rank's KV heads' budgets ``(B, Hkv)`` when each sequence's slots are shared over every
    KV head of the layer by ``layer_scores`` ``(B, Hkv_layer, P)`` (gathered from all
    tensor-parallel ranks: :meth:`ScoringContext.layer_heads`), with
    :func:`~mixkv.functional.adaptive_head_budgets`."""
    rows = [
        adaptive_head_budgets(
            layer_scores[b],
            int(ctx.budgets[b]),
            ctx.window_size,
            floor_ratio=floor_ratio,
            mass_scaling=mass_scaling,
        )
        for b in range(ctx.keys.shape[0])
    ]
    return ctx.own_heads(torch.stack(rows)).to(ctx.keys.device)


@dataclass
class SparseMMPress(SnapKVPress):
    """SparseMM: SnapKV scores, budgets proportional to each head's measured "visual head" score.

    ``head_scores`` is a per-(layer, head) table (query heads ``(L, H)`` or KV heads ``(L, Hkv)``),
    e.g. the ``visual_head_scores`` written by ``mixkv calibrate``, or a path to such a file. Each KV
    head keeps ``min_ratio * (budget - W)`` tokens plus a share of the rest proportional to its
    score; totals over the model are exact.

    Paper: Wang et al., "SparseMM: Head Sparsity Emerges from Visual Concept Responses in MLLMs",
    2025, https://arxiv.org/abs/2506.05344. Default ``min_ratio=0.1``.
    """

    head_scores: torch.Tensor | str | Path | None = field(default=None, repr=False)
    min_ratio: float = 0.1
    _table: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_scores is None:
            raise ValueError(
                "SparseMMPress needs head_scores: a (layers, heads) table of visual-head scores or the path "
                "of a file written by `mixkv calibrate`"
            )
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")
        from mixkv.presses.head_tables import resolve_head_table

        self._table = resolve_head_table(self.head_scores, "visual_head_scores")

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        if self._table.shape in ((num_layers, num_heads), (num_layers, num_kv_heads)):
            return
        raise ValueError(
            f"head_scores has shape {tuple(self._table.shape)} but this model has {num_layers} layers x {num_heads} "
            f"query heads ({num_kv_heads} KV heads): calibrate on this model with `mixkv calibrate`"
        )

    def head_budgets(self, ctx: ScoringContext) -> torch.Tensor:
        # The table covers whole layers; a tensor-parallel rank keeps its share of the allocation.
        kv_heads = ctx.layer_kv_heads
        num_heads = ctx.queries.shape[1] * kv_heads // ctx.keys.shape[1]
        table = self._table
        if table.shape[1] == num_heads:
            table = group_head_scores(table, kv_heads)
        # Only full-attention layers share the budget (sliding-window layers are not compressed).
        scores = table[list(ctx.compressible_layers)]
        rows = [
            head_score_budgets(scores, int(budget), ctx.window_size, int(length), min_ratio=self.min_ratio)[
                ctx.layer_rank
            ]
            for budget, length in zip(ctx.budgets.tolist(), ctx.lengths.tolist(), strict=True)
        ]
        return ctx.own_heads(torch.stack(rows)).to(ctx.keys.device)
