"""Attention over a head-wise compressed cache, in plain torch (no transformers).

A head-wise compressed layer keeps a different number of prompt entries in every KV head. They are
stored *packed*: one flat ``(T, head_dim)`` tensor for the whole layer, segment after segment
(segment = ``batch * kv_heads + kv_head``), with one length per segment, so no memory is spent
padding heads to the longest one. Tokens that arrive after compression (the observation window and
every decoded token) are the same for every head and live in a dense ``(S, T_tail, head_dim)`` tail.

To attend, each segment's entries are gathered into a transient ``(S, L_max + T_tail, D)`` block
(``L_max`` = longest segment) with a key mask, and one fused ``scaled_dot_product_attention`` call
covers every head at once. The padding exists only for the duration of the call, one layer at a
time; what the cache *holds* stays packed. On a CPU it brought the head-wise decoding step from
1.31x to 1.18x the uniform one, against a segment-wise softmax built from
``scatter_reduce``/``index_add`` (``docs/benchmarks/cpu.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def padded_segment_index(segment_lengths: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each slot of a ``(S, max_length)`` padded view reads from in the packed tensor.

    Parameters
    ----------
    segment_lengths : LongTensor ``(S,)``
        Entries of each segment, stored back to back.
    max_length : int
        At least ``segment_lengths.max()``.

    Returns
    -------
    index : LongTensor ``(S * max_length,)``
        Packed row of every slot (padding slots point at row 0 and are masked).
    valid : BoolTensor ``(S, max_length)``
        True for slots that hold an entry.
    """
    starts = torch.cumsum(segment_lengths, 0) - segment_lengths
    slots = torch.arange(max_length, device=segment_lengths.device)
    valid = slots.unsqueeze(0) < segment_lengths.unsqueeze(1)
    index = torch.where(
        valid, starts.unsqueeze(1) + slots.unsqueeze(0), torch.zeros_like(valid, dtype=torch.long)
    )
    return index.flatten(), valid


def packed_attention(
    queries: torch.Tensor,
    packed_keys: torch.Tensor,
    packed_values: torch.Tensor,
    segment_lengths: torch.Tensor,
    max_length: int,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    tail_visible: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Softmax attention of every segment's queries over its packed entries and its dense tail.

    Parameters
    ----------
    queries : Tensor ``(S, R, D)``
        ``R`` query rows per segment (query heads of the GQA group x query positions).
    packed_keys, packed_values : Tensor ``(T, D)``
        Packed entries of all segments, in segment order.
    segment_lengths : LongTensor ``(S,)``
    max_length : int
        Longest segment (``>= segment_lengths.max()``).
    tail_keys, tail_values : Tensor ``(S, T_tail, D)``
    tail_visible : BoolTensor broadcastable to ``(S, R, T_tail)``, or None
        True where a query row may attend to a tail entry; None when every tail entry is visible.
        Every row must see at least one entry (the newest token always sees itself).
    scaling : float
        Logit scale (``1/sqrt(D)`` for most models).

    Returns
    -------
    Tensor ``(S, R, D)``
    """
    segments, rows, head_dim = queries.shape
    tail_length = tail_keys.shape[1]
    index, valid = padded_segment_index(segment_lengths, max_length)
    keys = torch.cat([packed_keys.index_select(0, index).view(segments, max_length, head_dim), tail_keys], 1)
    values = torch.cat(
        [packed_values.index_select(0, index).view(segments, max_length, head_dim), tail_values], 1
    )
    prefix_visible = valid.unsqueeze(1).expand(segments, rows, max_length)
    if tail_visible is None:
        tail_visible = torch.ones((1, 1, 1), dtype=torch.bool, device=queries.device)
    visible = torch.cat([prefix_visible, tail_visible.expand(segments, rows, tail_length)], dim=-1)
    out = F.scaled_dot_product_attention(
        queries.unsqueeze(1),
        keys.unsqueeze(1),
        values.unsqueeze(1),
        attn_mask=visible.unsqueeze(1),
        scale=scaling,
    )
    return out.squeeze(1)


def causal_tail_visibility(tail_length: int, query_length: int, device: torch.device) -> torch.Tensor:
    """``(query_length, tail_length)`` mask: query ``i`` (the ``i``-th of the newest ``query_length``
    tokens, which are the last entries of the tail) sees tail entry ``t`` iff
    ``t <= tail_length - query_length + i``."""
    rows = torch.arange(query_length, device=device).unsqueeze(-1)
    cols = torch.arange(tail_length, device=device).unsqueeze(0)
    return cols <= rows + (tail_length - query_length)
