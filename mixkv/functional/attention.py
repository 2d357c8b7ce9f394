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

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class GroupPlan:
    """One length group of :func:`length_groups`, prepared once per layer by :func:`plan_groups` so
    that a decoding step does no host work and no index arithmetic it can avoid.

    Only Python ints and the group's segment ids (the tensor :func:`length_groups` made) are held:
    the plan adds no tensor to what a cache layer holds.
    """

    #: The group's segment ids (None: every segment, in order), as :func:`length_groups` gives them.
    segments: torch.Tensor | None
    #: The same segments as a slice when they are consecutive (queries, tail and output are then
    #: views, not copies), else None.
    rows: slice | None
    #: The group's longest segment: every segment is padded to it.
    longest: int
    #: When the group's entries are one run of consecutive segments of equal length, the packed row
    #: where the run starts: its padded block is then a view of the packed tensor. Else None.
    first_entry: int | None
    #: First packed row and length of each segment (for the gather when ``first_entry`` is None).
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    #: Whether some segment is shorter than ``longest`` (its padding must be masked).
    padded: bool


def plan_groups(segment_lengths: torch.Tensor, groups: Sequence[LengthGroup]) -> list[GroupPlan]:
    """The :class:`GroupPlan` of each of ``groups`` (:func:`length_groups` of ``segment_lengths``).

    Reads the lengths on the host once: call it when a layer is built, not at every step.
    """
    lengths = segment_lengths.tolist()
    starts = [0] * len(lengths)
    for segment in range(1, len(lengths)):
        starts[segment] = starts[segment - 1] + lengths[segment - 1]
    plans = []
    for segments, longest in groups:
        ids = list(range(len(lengths))) if segments is None else segments.tolist()
        first = ids[0] if ids else 0
        consecutive = ids == list(range(first, first + len(ids)))
        equal = all(lengths[segment] == longest for segment in ids)
        plans.append(
            GroupPlan(
                segments=segments,
                rows=slice(first, first + len(ids)) if consecutive else None,
                longest=longest,
                first_entry=(starts[first] if ids else 0) if consecutive and equal else None,
                starts=tuple(starts[segment] for segment in ids),
                lengths=tuple(lengths[segment] for segment in ids),
                padded=not equal,
            )
        )
    return plans


def packed_attention(
    queries: torch.Tensor,
    packed_keys: torch.Tensor,
    packed_values: torch.Tensor,
    segment_lengths: torch.Tensor,
    groups: Sequence[LengthGroup] | Sequence[GroupPlan],
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
    groups : list of ``(segments, longest)`` or of :class:`GroupPlan`
        :func:`length_groups` of ``segment_lengths`` (or :func:`plan_groups` of those, which a
        layer computes once); each group is attended in one call.
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
    plans = _plans(segment_lengths, groups)
    operands = (queries, packed_keys, packed_values, tail_keys, tail_values, tail_visible)
    if len(plans) == 1:
        return _attend_group(*operands, plans[0], scaling)
    out = queries.new_empty(queries.shape)
    for plan in plans:
        result = _attend_group(*operands, plan, scaling)
        if plan.rows is not None:
            out[plan.rows] = result
        else:
            assert plan.segments is not None
            out.index_copy_(0, plan.segments, result)
    return out


def _plans(
    segment_lengths: torch.Tensor, groups: Sequence[LengthGroup] | Sequence[GroupPlan]
) -> list[GroupPlan]:
    planned = [group for group in groups if isinstance(group, GroupPlan)]
    if len(planned) == len(groups):
        return planned
    return plan_groups(segment_lengths, [group for group in groups if not isinstance(group, GroupPlan)])


def _attend_group(
    queries: torch.Tensor,
    packed_keys: torch.Tensor,
    packed_values: torch.Tensor,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    tail_visible: torch.Tensor | None,
    plan: GroupPlan,
    scaling: float,
) -> torch.Tensor:
    """:func:`packed_attention` of one length group, padded to its ``longest``: ``(S', R, D)``.

    Every segment's keys are its entries, padding up to ``longest``, then its tail: the same block,
    entry for entry, whatever the group's shape, so the result does not depend on which of the
    shortcuts below was taken (a masked slot adds an exact zero, whatever finite entry it holds).
    """

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape[0] == 1:
            return tensor  # one segment, or broadcast over segments
        if plan.rows is not None:
            return tensor[plan.rows]
        assert plan.segments is not None
        return tensor.index_select(0, plan.segments)

    queries, tail_keys, tail_values = rows(queries), rows(tail_keys), rows(tail_values)
    count, query_rows, head_dim = queries.shape
    longest, tail_length = plan.longest, tail_keys.shape[1]
    valid = None
    if plan.first_entry is not None:  # one run of equal segments: a view, nothing to gather
        run = slice(plan.first_entry, plan.first_entry + count * longest)
        prefix_keys = packed_keys[run].view(count, longest, head_dim)
        prefix_values = packed_values[run].view(count, longest, head_dim)
    else:
        device = packed_keys.device
        slots = torch.arange(longest, device=device)
        starts = torch.tensor(plan.starts, device=device).unsqueeze(1)
        # A padding slot reads the entries after its segment's (clamped to the last row); masked.
        index = (starts + slots).clamp_(max=max(packed_keys.shape[0] - 1, 0)).flatten()
        prefix_keys = packed_keys.index_select(0, index).view(count, longest, head_dim)
        prefix_values = packed_values.index_select(0, index).view(count, longest, head_dim)
        if plan.padded:
            valid = slots < torch.tensor(plan.lengths, device=device).unsqueeze(1)  # (S', longest)
    keys = torch.cat([prefix_keys, tail_keys], 1)
    values = torch.cat([prefix_values, tail_values], 1)
    mask = None  # every entry visible to every row
    if tail_visible is not None:
        prefix_visible = valid.unsqueeze(1) if valid is not None else tail_visible.new_ones((1, 1, 1))
        mask = torch.cat(
            [
                prefix_visible.expand(count, query_rows, longest),
                rows(tail_visible).expand(count, query_rows, tail_length),
            ],
            dim=-1,
        ).unsqueeze(1)
    elif valid is not None:  # the same mask for every row: (S', 1, 1, longest + tail)
        mask = F.pad(valid, (0, tail_length), value=True)[:, None, None, :]
    out = F.scaled_dot_product_attention(
        queries.unsqueeze(1),
        keys.unsqueeze(1),
        values.unsqueeze(1),
        attn_mask=mask,
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
