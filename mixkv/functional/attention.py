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

A decoding step's cost at a small batch is not the data (a few hundred entries per head) but the
number of tensor operations: on a CPU, between the model's matrix products, each distinct one costs
10-20 us, several times its cost in a tight loop. Everything about the packed part that does not
change while decoding is therefore worked out once, when a layer is built (:func:`plan_packed`):
each group's rows (a slice when its segments are consecutive), and its padded prefix as *views*
of the packed tensors: the block itself for a run of equal segments, else each segment's entries
followed by filler rows, with the additive mask as views of a shared ``[-inf, 0]`` constant. A step
then assembles each group's keys, values and mask with one ``torch.cat`` each and attends; groups
of more than :data:`PIECEWISE_SEGMENTS` segments build a gather index instead. The plan holds no
storage of its own, so what a layer holds (``kv_cache_bytes``) is unchanged, and the block is the
same slot for slot whichever way it is assembled (a masked slot adds an exact zero whatever finite
entry it holds): outputs are bit for bit those of a gather into a zero-index-padded block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

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


#: A group of at most this many segments that needs a gather has its padded block assembled by one
#: ``torch.cat`` of views (each segment's entries, filler for its padding, its tail) instead of an
#: ``index_select`` with an index built at every call: fewer, cheaper operations for the few
#: segments of a small batch, too many views for a large one.
PIECEWISE_SEGMENTS = 16


@dataclass(frozen=True)
class GroupPlan:
    """One length group of :func:`length_groups`, prepared once per layer (:func:`plan_packed`)."""

    #: The group's segment ids, in increasing order.
    ids: tuple[int, ...]
    #: The same as a tensor (None: every segment, in order), as :func:`length_groups` gives them.
    segments: torch.Tensor | None
    #: The segments as a slice when they are consecutive (their queries, tails and outputs are
    #: then views), else None.
    rows: slice | None
    #: The group is every segment, in order (nothing to select).
    every: bool
    #: The group's longest segment: every segment is padded to it.
    longest: int
    #: ``(S', 1, longest, D)`` views of the packed keys and values when the group's entries are one
    #: run of consecutive segments of equal length (nothing to gather), else None.
    prefix: tuple[torch.Tensor, torch.Tensor] | None
    #: For a small group that needs a gather, each segment's padded prefix as views of the packed
    #: keys, values and the additive mask (0 for an entry, -inf for filler): its entries, then (if
    #: shorter than ``longest``) as many of the first packed rows as filler. None otherwise.
    pieces: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None
    #: First packed row and length of each segment.
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    #: Whether some segment is shorter than ``longest`` (its padding must be masked).
    padded: bool


@dataclass(frozen=True)
class PackedPlan:
    """What :func:`packed_attention` needs of a layer's packed part, worked out once (the packed part
    never changes): its groups, each with its rows and views of its padded block where possible.

    It holds Python ints, the groups' segment ids and *views*: of the packed tensors, and of a
    two-element constant shared by every plan of a device and dtype. No storage of its own, so a
    layer that keeps it holds no more bytes than before.
    """

    groups: tuple[GroupPlan, ...]
    #: The groups' rows are slices that tile every segment in order: the outputs concatenate.
    tiled: bool
    #: The packed keys and values it was worked out on, and their :func:`length_groups`.
    keys: torch.Tensor
    values: torch.Tensor
    length_groups: tuple[LengthGroup, ...]
    #: ``[-inf, 0]`` in the packed tensors' dtype: the additive mask's values (the pieces' masks
    #: are views of it), those ``scaled_dot_product_attention`` turns a boolean mask into.
    bias: torch.Tensor


_BIAS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _bias(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if (device, dtype) not in _BIAS:
        _BIAS[device, dtype] = torch.tensor([float("-inf"), 0.0], device=device, dtype=dtype)
    return _BIAS[device, dtype]


_TRUE: dict[torch.device, torch.Tensor] = {}


def shared_true(device: torch.device) -> torch.Tensor:
    """A ``(1, 1)`` boolean True shared by every caller on ``device``, to expand instead of
    allocating new flags."""
    if device not in _TRUE:
        _TRUE[device] = torch.ones((1, 1), dtype=torch.bool, device=device)
    return _TRUE[device]


def plan_packed(
    packed_keys: torch.Tensor,
    packed_values: torch.Tensor,
    segment_lengths: torch.Tensor,
    groups: Sequence[LengthGroup],
) -> PackedPlan:
    """The :class:`PackedPlan` of ``groups`` (:func:`length_groups` of ``segment_lengths``) over
    these packed tensors. Reads the lengths on the host once: call it when a layer is built."""
    lengths = segment_lengths.tolist()
    starts = [0] * len(lengths)
    for segment in range(1, len(lengths)):
        starts[segment] = starts[segment - 1] + lengths[segment - 1]
    bias = _bias(packed_keys.device, packed_keys.dtype)
    hidden, seen = bias[:1], bias[1:]
    source = (packed_keys, packed_values, tuple(groups))
    plans = []
    for segments, longest in groups:
        ids = list(range(len(lengths))) if segments is None else segments.tolist()
        first = ids[0] if ids else 0
        consecutive = ids == list(range(first, first + len(ids)))
        equal = all(lengths[segment] == longest for segment in ids)
        prefix = pieces = None
        if consecutive and equal:
            run = starts[first] if ids else 0
            prefix = (
                _rows_view(packed_keys, run, len(ids), longest),
                _rows_view(packed_values, run, len(ids), longest),
            )
        elif len(ids) <= PIECEWISE_SEGMENTS:
            key_pieces: list[torch.Tensor] = []
            value_pieces: list[torch.Tensor] = []
            flag_pieces: list[torch.Tensor] = []
            for segment in ids:
                entries = slice(starts[segment], starts[segment] + lengths[segment])
                key_pieces.append(packed_keys[entries])
                value_pieces.append(packed_values[entries])
                flag_pieces.append(seen.expand(lengths[segment]))
                filler = longest - lengths[segment]
                if filler:  # any finite rows will do: masked (there are at least `longest` rows)
                    key_pieces.append(packed_keys[:filler])
                    value_pieces.append(packed_values[:filler])
                    flag_pieces.append(hidden.expand(filler))
            pieces = (tuple(key_pieces), tuple(value_pieces), tuple(flag_pieces))
        plans.append(
            GroupPlan(
                ids=tuple(ids),
                segments=segments,
                rows=slice(first, first + len(ids)) if consecutive else None,
                every=ids == list(range(len(lengths))),
                longest=longest,
                prefix=prefix,
                pieces=pieces,
                starts=tuple(starts[segment] for segment in ids),
                lengths=tuple(lengths[segment] for segment in ids),
                padded=not equal,
            )
        )
    order = sorted(plans, key=lambda plan: plan.ids[0] if plan.ids else -1)
    covered = 0
    for plan in order:
        if plan.rows is None or plan.rows.start != covered:
            return PackedPlan(tuple(plans), False, *source, bias=bias)
        covered = plan.rows.stop
    return PackedPlan(tuple(order), covered == len(lengths), *source, bias=bias)


def _rows_view(packed: torch.Tensor, first: int, count: int, length: int) -> torch.Tensor:
    return packed[first : first + count * length].view(count, 1, length, packed.shape[1])


def packed_attention(
    queries: torch.Tensor,
    packed_keys: torch.Tensor,
    packed_values: torch.Tensor,
    segment_lengths: torch.Tensor,
    groups: Sequence[LengthGroup] | PackedPlan,
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
    groups : list of ``(segments, longest)``, or :class:`PackedPlan`
        :func:`length_groups` of ``segment_lengths`` (or their :func:`plan_packed` over these
        packed tensors, which a layer works out once); each group is attended in one call.
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
    plan = groups
    if not isinstance(plan, PackedPlan):
        plan = plan_packed(packed_keys, packed_values, segment_lengths, plan)
    elif plan.keys is not packed_keys or plan.values is not packed_values:  # planned on other tensors
        plan = plan_packed(packed_keys, packed_values, segment_lengths, plan.length_groups)
    visible = None if tail_visible is None else tail_visible.unsqueeze(1)
    operands = (queries, tail_keys, tail_values, packed_keys, packed_values, visible, plan.bias)
    if plan.tiled:
        results = [_attend_group(*operands, group, scaling) for group in plan.groups]
        return (results[0] if len(results) == 1 else torch.cat(results)).squeeze(1)
    results = [_attend_group(*operands, group, scaling).squeeze(1) for group in plan.groups]
    if queries.shape[0] <= PIECEWISE_SEGMENTS:  # few segments: one concatenation of row views
        row_of: dict[int, torch.Tensor] = {}
        for group, result in zip(plan.groups, results, strict=True):
            for position, segment in enumerate(group.ids):
                row_of[segment] = result[position : position + 1]
        return torch.cat([row_of[segment] for segment in range(queries.shape[0])])
    out = queries.new_empty(queries.shape)
    for group, result in zip(plan.groups, results, strict=True):
        if group.rows is not None:
            out[group.rows] = result
        else:
            assert group.segments is not None
            out.index_copy_(0, group.segments, result)
    return out


def _attend_group(
    queries: torch.Tensor,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    packed_keys: torch.Tensor,
    packed_values: torch.Tensor,
    tail_visible: torch.Tensor | None,
    bias: torch.Tensor,
    group: GroupPlan,
    scaling: float,
) -> torch.Tensor:
    """:func:`packed_attention` of one length group, padded to its ``longest``: ``(S', 1, R, D)``.

    Every segment's keys are its entries, padding up to ``longest``, then its tail: the same block
    slot for slot whichever way it is assembled, and a masked slot adds an exact zero whatever
    finite entry it holds, so the result is bit for bit the same on every path.
    """
    pick = partial(_pick, group=group)
    longest, tail_length, head_dim = group.longest, tail_keys.shape[1], tail_keys.shape[2]
    count = len(group.ids)
    queries = pick(queries).unsqueeze(1)
    query_rows = queries.shape[2]
    shape = (count, 1, longest + tail_length, head_dim)
    valid = None  # (S', 1, 1, longest) boolean: slots that hold an entry
    prefix_bias = None  # the same as an additive mask
    if group.pieces is not None:  # one concatenation of views: entries, filler, tail per segment
        key_pieces, value_pieces, flag_pieces = group.pieces
        key_parts: list[torch.Tensor] = []
        value_parts: list[torch.Tensor] = []
        piece = 0
        for segment, length in zip(group.ids, group.lengths, strict=True):
            step = 1 if length == longest else 2
            key_parts += [*key_pieces[piece : piece + step], tail_keys[segment]]
            value_parts += [*value_pieces[piece : piece + step], tail_values[segment]]
            piece += step
        keys = torch.cat(key_parts).view(shape)
        values = torch.cat(value_parts).view(shape)
        if group.padded:
            prefix_bias = torch.cat(flag_pieces).view(count, 1, 1, longest)
            if tail_visible is not None or prefix_bias.dtype != queries.dtype:
                valid, prefix_bias = prefix_bias == 0, None
    else:
        if group.prefix is not None:  # one run of equal segments: views, nothing to gather
            prefix_keys, prefix_values = group.prefix
        else:
            device = packed_keys.device
            starts = torch.tensor(group.starts, device=device).unsqueeze(1)
            # A padding slot reads the rows after its segment's (clamped to the last one): masked.
            last = max(packed_keys.shape[0] - 1, 0)
            index = (starts + torch.arange(longest, device=device)).clamp_(max=last).flatten()
            prefix_keys = packed_keys.index_select(0, index).view(count, 1, longest, head_dim)
            prefix_values = packed_values.index_select(0, index).view(count, 1, longest, head_dim)
            if group.padded:
                lengths = torch.tensor(group.lengths, device=device).unsqueeze(1)
                valid = (torch.arange(longest, device=device) < lengths)[:, None, None, :]
        keys = torch.cat([prefix_keys, pick(tail_keys).unsqueeze(1)], 2)
        values = torch.cat([prefix_values, pick(tail_values).unsqueeze(1)], 2)
    mask = None  # every entry visible to every row
    if tail_visible is not None:
        prefix_visible = valid if valid is not None else tail_visible.new_ones((1, 1, 1, 1))
        mask = torch.cat(
            [
                prefix_visible.expand(count, 1, query_rows, longest),
                pick(tail_visible).expand(count, 1, query_rows, tail_length),
            ],
            dim=-1,
        )
    elif prefix_bias is not None:  # the same for every query row; additive, as SDPA would make it
        mask = torch.cat([prefix_bias, bias[1:].view(1, 1, 1, 1).expand(count, 1, 1, tail_length)], dim=-1)
    elif valid is not None:  # the same for every query row
        mask = F.pad(valid, (0, tail_length), value=True)
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scaling)


def _pick(tensor: torch.Tensor, group: GroupPlan) -> torch.Tensor:
    """The group's rows of a per-segment ``tensor`` (a view where possible)."""
    if group.every or tensor.shape[0] == 1:
        return tensor  # every segment, or one broadcast over segments
    if group.rows is not None:
        return tensor[group.rows]
    if group.pieces is not None:
        return torch.cat([tensor[segment : segment + 1] for segment in group.ids])
    assert group.segments is not None
    return tensor.index_select(0, group.segments)


def causal_tail_visibility(tail_length: int, query_length: int, device: torch.device) -> torch.Tensor:
    """``(query_length, tail_length)`` mask: query ``i`` (the ``i``-th of the newest ``query_length``
    tokens, which are the last entries of the tail) sees tail entry ``t`` iff
    ``t <= tail_length - query_length + i``."""
    rows = torch.arange(query_length, device=device).unsqueeze(-1)
    cols = torch.arange(tail_length, device=device).unsqueeze(0)
    return cols <= rows + (tail_length - query_length)
