"""MixKV: importance mixed with diversity, weighted by head redundancy, on any base budget policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from mixkv.functional import mixkv_scores
from mixkv.presses.base import BasePress, ScoringContext
from mixkv.presses.budget_policies import AdaKVPress, PyramidKVPress, SnapKVPress, SparseMMPress
from mixkv.presses.multimodal import VLCachePress

BASES = ("snapkv", "pyramidkv", "adakv", "sparsemm", "vlcache")


@dataclass
class MixKVPress(BasePress):
    """MixKV: per-head mix of importance and diversity, on top of a base method's budgets.

    For KV head ``h`` and prefix position ``j``:

    .. math::

        s_h(j) = r_h \\, div_h(j) + (1 - r_h) \\, (I_h(j) + n'_h(j))

    with ``I`` the SnapKV importance, ``n'`` the min-max normalised value norm and ``div`` the
    min-max normalised negative cosine to the head's mean key (both rescaled to the mean of ``I``),
    and ``r_h`` the head's redundancy (mean pairwise cosine similarity of its keys, in [0, 1]).
    Redundant heads (keys all alike, typical of image tokens) are steered towards diversity.
    The budget allocation is the base method's own, computed from ``I``. On ``base="vlcache"``
    the importance ``I`` is VL-Cache's accumulated post-vision attention and the budgets are its
    sparsity-proportional layer budgets (:class:`~mixkv.presses.VLCachePress`).

    Paper: Liu et al., "Mixing Importance with Diversity: Joint Optimization for KV Cache
    Compression in Large Vision-Language Models", 2025, https://arxiv.org/abs/2510.20707.

    Parameters
    ----------
    base : {"snapkv", "pyramidkv", "adakv", "sparsemm", "vlcache"}, default "snapkv"
        Budget policy to ride on.
    redundancy : Tensor, str or Path, optional
        Offline ``(layers, kv_heads)`` redundancy table (or a file from ``mixkv calibrate``). By
        default ``r_h`` is computed online from the current prompt (the public code instead reuses
        one table measured on Qwen2-VL-7B for every model).
    head_scores, min_ratio
        SparseMM's visual-head table and floor, used when ``base="sparsemm"``.
    beta
        PyramidKV's slope parameter, used when ``base="pyramidkv"``.
    floor_ratio, mass_scaling
        AdaKV's per-head floor and score scaling, used when ``base="adakv"``.
    sparsity_threshold
        VL-Cache's sparsity threshold (fraction of a row's maximum), used when ``base="vlcache"``.
    """

    base: Literal["snapkv", "pyramidkv", "adakv", "sparsemm", "vlcache"] = "snapkv"
    redundancy: torch.Tensor | str | Path | None = field(default=None, repr=False)
    head_scores: torch.Tensor | str | Path | None = field(default=None, repr=False)
    min_ratio: float = 0.1
    beta: int = 20
    floor_ratio: float = 0.2
    mass_scaling: bool = True
    sparsity_threshold: float = 0.01
    _base_press: BasePress = field(init=False, repr=False, compare=False)
    _redundancy_table: torch.Tensor | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base not in BASES:
            raise ValueError(f"unknown base {self.base!r}: choose one of {', '.join(BASES)}")
        common = {
            "budget": self.budget,
            "compression_ratio": self.compression_ratio,
            "window_size": self.window_size,
            "kernel_size": self.kernel_size,
            "pooling": self.pooling,
        }
        base_press: BasePress
        if self.base == "snapkv":
            base_press = SnapKVPress(**common)  # type: ignore[arg-type]
        elif self.base == "pyramidkv":
            base_press = PyramidKVPress(**common, beta=self.beta)  # type: ignore[arg-type]
        elif self.base == "adakv":
            base_press = AdaKVPress(**common, floor_ratio=self.floor_ratio, mass_scaling=self.mass_scaling)  # type: ignore[arg-type]
        elif self.base == "vlcache":
            base_press = VLCachePress(**common, sparsity_threshold=self.sparsity_threshold)  # type: ignore[arg-type]
        else:
            base_press = SparseMMPress(**common, head_scores=self.head_scores, min_ratio=self.min_ratio)  # type: ignore[arg-type]
        self._base_press = base_press
        self._redundancy_table = None
        if self.redundancy is not None:
            from mixkv.presses.head_tables import resolve_head_table

            table = resolve_head_table(self.redundancy, "redundancy")
            if table.min() < 0 or table.max() > 1:
                raise ValueError(
                    "redundancy values must lie in [0, 1] (mean pairwise cosine similarity, clipped)"
                )
            self._redundancy_table = table

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        self._base_press.check_model(num_layers, num_heads, num_kv_heads)
        table = self._redundancy_table
        if table is not None and tuple(table.shape) != (num_layers, num_kv_heads):
            raise ValueError(
                f"redundancy table has shape {tuple(table.shape)} but this model has {num_layers} layers x "
                f"{num_kv_heads} KV heads: it was measured on another model; run `mixkv calibrate` on this one "
                "or drop redundancy= to compute it online"
            )

    def head_budgets(self, ctx: ScoringContext) -> torch.Tensor:
        return self._base_press.head_budgets(ctx)

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        redundancy = None
        if self._redundancy_table is not None:
            redundancy = ctx.own_heads(self._redundancy_table[ctx.layer_idx]).to(ctx.keys.device)
        return mixkv_scores(
            ctx.queries,
            ctx.keys,
            ctx.values,
            window_size=ctx.window_size,
            kernel_size=self.kernel_size,
            pooling=self.pooling,
            redundancy=redundancy,
            scaling=ctx.scaling,
            key_mask=ctx.key_mask,
            # shared with the base's budget allocation, computed once
            importance=self._base_press.scores(ctx) if self.base == "vlcache" else ctx.importance,
        )
