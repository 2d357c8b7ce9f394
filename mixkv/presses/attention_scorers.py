"""Presses scored by attention, with a uniform budget: TOVA, ExpectedAttention, and MixKV on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixkv.functional import (
    expected_attention,
    future_rotary,
    last_query_attention,
    mixkv_mix,
    sinks_on_top,
    unrotate_queries,
)
from mixkv.presses.base import BasePress, ScoringContext


@dataclass
class TOVAPress(BasePress):
    """TOVA: keep the positions the last prompt token attends to most.

    Score: ``TOVA(j) = mean_{h'} softmax_j(s q_{h',N} . k_j)``, the last query's attention averaged
    over every query head, so every KV head keeps the same positions (the authors' default, and
    kvpress 0.5.5's ``TOVAPress``); ``per_head=True`` averages over each KV head's query group
    instead. Needs the last query only: the default ``window_size=1`` keeps just the last token
    beside the best-scored ones, as kvpress does (a larger window keeps the last ``window_size``).

    Paper: Oren et al., "Transformers are Multi-State RNNs", 2024, https://arxiv.org/abs/2401.06104.
    Defaults: ``window_size=1``, ``per_head=False``.
    """

    window_size: int = 1
    per_head: bool = False

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        return last_query_attention(
            ctx.queries,
            ctx.keys,
            ctx.window_size,
            per_head=self.per_head,
            scaling=ctx.scaling,
            key_mask=ctx.key_mask,
        )


@dataclass
class ExpectedAttentionPress(BasePress):
    """ExpectedAttention: keep the positions future queries are expected to attend to most.

    The observation window's queries, un-rotated to their pre-rotary form, are modelled as a
    Gaussian (mean ``mu``, covariance ``Sigma`` per query head); the rotary rotation averaged over
    the next ``n_future_positions`` positions ``R`` moves it to the future, and each position scores
    the expected attention of such a query, weighted by its value norm:

    ``z(j) = s (R mu) . k_j + s^2 / 2 k_j^T R Sigma R^T k_j``,
    ``score(j) = (mean_{GQA group} softmax_j z(j) + epsilon) ||v_j||``.

    The first ``n_sink`` tokens are left out of the softmax and always kept. The maths is kvpress
    0.5.5's ``ExpectedAttentionPress`` (tested against it); the one difference is which queries the
    Gaussian is fitted on: kvpress fits it on every prompt query after the sinks, this press on the
    ``window_size`` queries of the observation window (the ones every mixkv press sees, also when the
    prompt arrives in chunks), which are always kept.

    Paper: Devoto et al. (NVIDIA), "Expected Attention: KV Cache Compression by Estimating Attention
    from Future Queries Distribution", 2025, https://arxiv.org/abs/2510.00636. Defaults (kvpress
    0.5.5): ``n_future_positions=512``, ``n_sink=4``, ``use_covariance=True``, ``use_vnorm=True``,
    ``epsilon=0.0``; ``window_size=32``.

    Needs the model's rotary tables (every supported family has them); presses inside transformers'
    continuous batching do not receive them and refuse it.
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.n_future_positions, bool) or not isinstance(self.n_future_positions, int):
            raise ValueError(f"n_future_positions must be an integer >= 1, got {self.n_future_positions!r}")
        if self.n_future_positions < 1:
            raise ValueError(f"n_future_positions must be an integer >= 1, got {self.n_future_positions}")
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be an integer >= 0, got {self.n_sink!r}")
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        if ctx.query_rotary is None or ctx.rope_inv_freq is None:
            raise ValueError(
                "ExpectedAttentionPress needs the model's rotary position tables, which this compression "
                "path does not provide (continuous batching); use another press there"
            )
        cos, sin = ctx.query_rotary
        window_mask = ctx.head_mask[:, 0, -ctx.window_size :]
        future_cos, future_sin = future_rotary(
            cos[:, -1], sin[:, -1], ctx.rope_inv_freq, self.n_future_positions
        )
        return expected_attention(
            unrotate_queries(ctx.queries, cos, sin),
            ctx.keys,
            ctx.values,
            future_cos,
            future_sin,
            ctx.window_size,
            n_sink=self.n_sink,
            use_covariance=self.use_covariance,
            use_vnorm=self.use_vnorm,
            epsilon=self.epsilon,
            scaling=ctx.scaling,
            key_mask=ctx.key_mask,
            query_mask=window_mask,
        )


@dataclass
class MixKVTOVAPress(TOVAPress):
    """MixKV on TOVA: the MixKV mix with TOVA's score as the importance, uniform budget.

    ``s_h(j) = r_h div_h(j) + (1 - r_h) (TOVA(j) + n'_h(j))``, with the value-norm term ``n'`` and the
    diversity ``div`` rescaled to the mean of TOVA's score (:func:`mixkv.functional.mixkv_mix`) and
    ``r_h`` the head's online redundancy. Papers: MixKV (https://arxiv.org/abs/2510.20707) and TOVA.
    Defaults as :class:`TOVAPress`.
    """

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        return mixkv_mix(super().scores(ctx), ctx.keys, ctx.values, ctx.window_size, key_mask=ctx.key_mask)


@dataclass
class MixKVExpectedAttentionPress(ExpectedAttentionPress):
    """MixKV on ExpectedAttention: the MixKV mix with ExpectedAttention's score as the importance.

    ``s_h(j) = r_h div_h(j) + (1 - r_h) (EA_h(j) + n'_h(j))`` (:func:`mixkv.functional.mixkv_mix`),
    uniform budget; the ``n_sink`` sinks stay always kept. Papers: MixKV
    (https://arxiv.org/abs/2510.20707) and ExpectedAttention. Defaults as
    :class:`ExpectedAttentionPress`.
    """

    def scores(self, ctx: ScoringContext) -> torch.Tensor:
        mixed = mixkv_mix(super().scores(ctx), ctx.keys, ctx.values, ctx.window_size, key_mask=ctx.key_mask)
        return sinks_on_top(mixed, ctx.head_mask[..., : ctx.keys.shape[2] - ctx.window_size], self.n_sink)
