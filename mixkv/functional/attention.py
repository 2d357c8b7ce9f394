"""Attention over a compressed cache, in plain torch (no transformers).

A head-wise compressed layer keeps a different number of prompt entries in every KV head. We store
those entries *packed*: one flat ``(T, head_dim)`` tensor for the whole layer, where entry ``t``
belongs to segment ``segment_ids[t]`` (segment = ``batch * kv_heads + kv_head``), so no memory is
spent padding heads to the longest one. Tokens that arrive after compression (the observation
window and every decoded token) are the same for every head and live in a dense
``(batch, kv_heads, T_tail, head_dim)`` tail.

Attention over both parts is computed as two *partial* softmaxes (running max, sum of
exponentials, unnormalised output) that are merged exactly, the same algebra flash-attention uses
to combine blocks:

.. math::

    m = \\max(m_1, m_2), \\quad
    o = \\frac{e^{m_1-m} o_1 + e^{m_2-m} o_2}{e^{m_1-m} s_1 + e^{m_2-m} s_2}

Everything is vectorised over segments (``scatter_reduce``/``index_add``), with no Python loop
over heads. Computation is in float32 whatever the storage dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class SoftmaxPartial(NamedTuple):
    """Unnormalised attention over one block of keys.

    Attributes
    ----------
    row_max : Tensor ``(S, G)``
        Maximum logit per query row (``-inf`` when the block has no visible key for that row).
    row_sum : Tensor ``(S, G)``
        ``sum(exp(logit - row_max))``.
    output : Tensor ``(S, G, D)``
        ``sum(exp(logit - row_max) * value)``.
    """

    row_max: torch.Tensor
    row_sum: torch.Tensor
    output: torch.Tensor


def packed_softmax_partial(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    segment_ids: torch.Tensor,
    scaling: float,
) -> SoftmaxPartial:
    """Partial softmax attention of every segment's queries over its packed keys.

    Parameters
    ----------
    queries : Tensor ``(S, G, D)``
        ``G`` query rows per segment (query heads of the GQA group x query positions).
    keys, values : Tensor ``(T, D)``
        Packed entries of all segments.
    segment_ids : LongTensor ``(T,)``
        Segment of each entry, in ``[0, S)``.
    scaling : float
        Logit scale (``1/sqrt(D)`` for most models).
    """
    num_segments, rows, head_dim = queries.shape
    q = queries.float()
    seg = segment_ids.long()
    row_max = torch.full((num_segments, rows), float("-inf"), device=q.device)
    row_sum = torch.zeros((num_segments, rows), device=q.device)
    output = torch.zeros((num_segments, rows, head_dim), device=q.device)
    if keys.shape[0] == 0:
        return SoftmaxPartial(row_max, row_sum, output)
    k = keys.float()
    # (T, G): each entry against the queries of its own segment only.
    logits = torch.bmm(q.index_select(0, seg), k.unsqueeze(-1)).squeeze(-1) * scaling
    row_max = row_max.scatter_reduce(0, seg.unsqueeze(-1).expand_as(logits), logits, "amax")
    weights = torch.exp(logits - row_max.index_select(0, seg))
    row_sum = row_sum.index_add(0, seg, weights)
    output = output.index_add(0, seg, weights.unsqueeze(-1) * values.float().unsqueeze(1))
    return SoftmaxPartial(row_max, row_sum, output)


def dense_softmax_partial(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor | None,
    scaling: float,
) -> SoftmaxPartial:
    """Partial softmax attention over a dense block.

    Parameters
    ----------
    queries : Tensor ``(S, G, D)``
    keys, values : Tensor ``(S, T, D)``
    visible : BoolTensor broadcastable to ``(S, G, T)``, or None
        True where the query row may attend to the key; None when every key is visible.
    scaling : float
    """
    logits = torch.bmm(queries.float(), keys.float().transpose(1, 2)) * scaling
    if visible is None:
        row_max = logits.amax(dim=-1)
        weights = torch.exp(logits - row_max.unsqueeze(-1))
        return SoftmaxPartial(row_max, weights.sum(-1), torch.bmm(weights, values.float()))
    logits = logits.masked_fill(~visible, float("-inf"))
    row_max = logits.amax(dim=-1)
    safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(logits - safe_max.unsqueeze(-1))
    return SoftmaxPartial(row_max, weights.sum(-1), torch.bmm(weights, values.float()))


def merge_softmax_partials(first: SoftmaxPartial, second: SoftmaxPartial) -> torch.Tensor:
    """Combine two partial softmaxes over disjoint key sets into the normalised output ``(S, G, D)``."""
    row_max = torch.maximum(first.row_max, second.row_max)
    safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    w1 = torch.exp(first.row_max - safe_max)
    w2 = torch.exp(second.row_max - safe_max)
    numerator = first.output * w1.unsqueeze(-1) + second.output * w2.unsqueeze(-1)
    denominator = first.row_sum * w1 + second.row_sum * w2
    return numerator / denominator.unsqueeze(-1)


def causal_tail_visibility(tail_length: int, query_length: int, device: torch.device) -> torch.Tensor:
    """``(query_length, tail_length)`` mask: query ``i`` (the ``i``-th of the newest ``query_length``
    tokens, which are the last entries of the tail) sees tail entry ``t`` iff
    ``t <= tail_length - query_length + i``."""
    rows = torch.arange(query_length, device=device).unsqueeze(-1)
    cols = torch.arange(tail_length, device=device).unsqueeze(0)
    return cols <= rows + (tail_length - query_length)
