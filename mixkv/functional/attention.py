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

When segment lengths differ widely (a full-cache row decoded in one batch with compressed ones,
or heads whose adaptive budgets differ by 10x), padding every segment to the longest makes the
block mostly padding, and copying it at every decoding step costs more than the attention itself.
:func:`length_groups` therefore splits the segments into groups whose lengths are within a factor
of two, and each group gets its own block and call: at most twice a group's entries are gathered.
Segments of equal length (uniform budgets) stay one group, one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Groups of segments no longer than this are not split further (:func:`length_groups`): below it a
#: call's fixed cost outweighs the padding it would save.
UNSPLIT_LENGTH = 64

#: One group of :func:`length_groups`: its segments (None: all of them, in order) and its longest.
LengthGroup = tuple[torch.Tensor | None, int]


def length_groups(segment_lengths: torch.Tensor, unsplit_length: int = UNSPLIT_LENGTH) -> list[LengthGroup]:
    """Segments grouped for :func:`packed_attention` so that padding each group to its own longest
    segment at most doubles its entries.

    Taken from the longest down, a segment joins the current group while it is longer than half
    the group's longest, or while that longest is at most ``unsplit_length``. Reads the lengths on
    the host once: compute the groups when a layer is built, not at every step.

    Returns
    -------
    list of ``(segments, longest)``
        ``segments``: LongTensor of segment ids in increasing order, or None for a single group of
        every segment; ``longest``: the group's longest segment.
    """
    lengths = segment_lengths.tolist()
    order = sorted(range(len(lengths)), key=lambda segment: -lengths[segment])
    grouped: list[tuple[list[int], int]] = []
    for segment in order:
        length = lengths[segment]
        if grouped and (2 * length > grouped[-1][1] or grouped[-1][1] <= unsplit_length):
            grouped[-1][0].append(segment)
        else:
            grouped.append(([segment], length))
    if len(grouped) <= 1:
        return [(None, grouped[0][1] if grouped else 0)]
    device = segment_lengths.device
    return [(torch.tensor(sorted(members), device=device), longest) for members, longest in grouped]


def padded_segment_index(
    segment_lengths: torch.Tensor, max_length: int, segments: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each slot of a ``(S, max_length)`` padded view reads from in the packed tensor.

    Parameters
    ----------
    segment_lengths : LongTensor ``(S,)``
        Entries of each segment, stored back to back.
    max_length : int
        At least the longest of the segments viewed.
    segments : LongTensor ``(S',)``, optional
        View only these segments (rows in this order); default all.

    Returns
    -------
    index : LongTensor ``(S' * max_length,)``
        Packed row of every slot (padding slots point at row 0 and are masked).
    valid : BoolTensor ``(S', max_length)``
        True for slots that hold an entry.
    """
    starts = torch.cumsum(segment_lengths, 0) - segment_lengths
    if segments is not None:
        starts, segment_lengths = starts[segments], segment_lengths[segments]
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
    groups: list[LengthGroup],
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
    groups : list of ``(segments, longest)``
        :func:`length_groups` of ``segment_lengths``; each group is attended in one call.
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
    if tail_visible is None:
        tail_visible = torch.ones((1, 1, 1), dtype=torch.bool, device=queries.device)
    operands = (queries, packed_keys, packed_values, segment_lengths, tail_keys, tail_values, tail_visible)
    if len(groups) == 1:
        return _attend_group(*operands, *groups[0], scaling)
    out = queries.new_empty(queries.shape)
    for segments, longest in groups:
        out[segments] = _attend_group(*operands, segments, longest, scaling)
    return out


def _attend_group(
    queries: torch.Tensor,
    packed_keys: torch.Tensor,
    packed_values: torch.Tensor,
    segment_lengths: torch.Tensor,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    tail_visible: torch.Tensor,
    segments: torch.Tensor | None,
    longest: int,
    scaling: float,
) -> torch.Tensor:
    """:func:`packed_attention` of one length group, padded to its ``longest``: ``(S', R, D)``."""

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if segments is None or tensor.shape[0] == 1 else tensor[segments]

    queries, tail_keys, tail_values = rows(queries), rows(tail_keys), rows(tail_values)
    count, query_rows, head_dim = queries.shape
    index, valid = padded_segment_index(segment_lengths, longest, segments)
    keys = torch.cat([packed_keys.index_select(0, index).view(count, longest, head_dim), tail_keys], 1)
    values = torch.cat([packed_values.index_select(0, index).view(count, longest, head_dim), tail_values], 1)
    visible = torch.cat(
        [
            valid.unsqueeze(1).expand(count, query_rows, longest),
            rows(tail_visible).expand(count, query_rows, tail_keys.shape[1]),
        ],
        dim=-1,
    )
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
