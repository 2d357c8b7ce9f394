"""Presses that differ by score, with a uniform budget: KeyDiff, Knorm, StreamingLLM, Random."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixkv.functional import key_diversity, key_norm_scores
from mixkv.presses.base import BasePress, ScoringContext


@dataclass
class KeyDiffPress(BasePress):
    """KeyDiff: keep the keys least similar to the head's mean key direction.

    Score: ``-cos(k_j, mu)`` with ``mu`` the mean normalised key over the whole prompt (window
    included), min-max normalised. Needs no queries, so it also suits query-agnostic use.

    Paper: Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
    Inference in Resource-Constrained Environments", 2025, https://arxiv.org/abs/2504.15364.
    """

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        return key_diversity(ctx.keys, ctx.window_size, key_mask=ctx.key_mask)


@dataclass
class KnormPress(BasePress):
    """Knorm: keep the keys with the smallest L2 norm (score ``-||k_j||``).

    Paper: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
    2024, https://arxiv.org/abs/2406.11430.
    """

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        return key_norm_scores(ctx.keys, ctx.window_size, key_mask=ctx.key_mask)


@dataclass
class StreamingLLMPress(BasePress):
    """StreamingLLM: keep the first ``n_sink`` tokens (attention sinks) and the most recent ones.

    Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks", 2023,
    https://arxiv.org/abs/2309.17453. Default ``n_sink=4``.
    """

    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        prefix = ctx.keys.shape[2] - ctx.window_size
        mask = ctx.head_mask[..., :prefix]
        # Position among the head's real entries (left padding shifts nothing).
        rank = (mask.long().cumsum(-1) - 1).float()
        score = torch.where(rank < self.n_sink, torch.full_like(rank, float(ctx.keys.shape[2])), rank)
        return score.masked_fill(~mask, float("-inf"))


@dataclass
class RandomPress(BasePress):
    """Random eviction, a baseline: uniform random scores from a seeded generator.

    Default ``seed=0``; each layer draws its own scores (seeded by ``seed`` and the layer index) so
    results are reproducible.
    """

    seed: int = 0

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        batch, kv_heads, length = ctx.keys.shape[:3]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + ctx.layer_idx)
        score = torch.rand((batch, kv_heads, length - ctx.window_size), generator=generator)
        score = score.to(ctx.keys.device)
        return score.masked_fill(~ctx.head_mask[..., : length - ctx.window_size], float("-inf"))
