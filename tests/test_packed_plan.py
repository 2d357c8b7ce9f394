"""A layer's packed-attention plan (views worked out once) gives bit for bit the outputs of gathering
each group into a zero-index-padded block at every call, and holds no storage of its own."""

import pytest
import torch
import torch.nn.functional as F

from mixkv import kv_cache_bytes
from mixkv.functional.attention import (
    PIECEWISE_SEGMENTS,
    length_groups,
    packed_attention,
    padded_segment_index,
    plan_packed,
)
from mixkv.integration.cache import PackedCompressedLayer


def gathered_reference(
    queries, packed_keys, packed_values, segment_lengths, tail_keys, tail_values, visible, scale
):
    """Each length group gathered into a block whose padding slots read packed row 0, one boolean
    mask materialised for every query row, one SDPA call per group (the kernel before plans)."""
    if visible is None:
        visible = torch.ones((1, 1, 1), dtype=torch.bool)
    out = queries.new_empty(queries.shape)
    for segments, longest in length_groups(segment_lengths):
        ids = torch.arange(queries.shape[0]) if segments is None else segments
        q, tk, tv = queries[ids], tail_keys[ids], tail_values[ids]
        count, rows, dim = q.shape
        index, valid = padded_segment_index(segment_lengths, longest, ids)
        keys = torch.cat([packed_keys.index_select(0, index).view(count, longest, dim), tk], 1)
        values = torch.cat([packed_values.index_select(0, index).view(count, longest, dim), tv], 1)
        tail_visible = visible if visible.shape[0] == 1 else visible[ids]
        mask = torch.cat(
            [valid.unsqueeze(1).expand(count, rows, longest), tail_visible.expand(count, rows, tk.shape[1])],
            -1,
        )
        out[ids] = F.scaled_dot_product_attention(
            q.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1), attn_mask=mask.unsqueeze(1), scale=scale
        ).squeeze(1)
    return out


def random_case(lengths, rows, tail, dim=16, padded_tail=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    segment_lengths = torch.tensor(lengths, dtype=torch.long)
    total, count = int(segment_lengths.sum()), len(lengths)
    packed_keys = torch.randn(total, dim, generator=g).to(dtype)
    packed_values = torch.randn(total, dim, generator=g).to(dtype)
    queries = torch.randn(count, rows, dim, generator=g).to(dtype)
    tail_keys = torch.randn(count, tail, dim, generator=g).to(dtype)
    tail_values = torch.randn(count, tail, dim, generator=g).to(dtype)
    visible = None
    if padded_tail:
        visible = torch.rand(count, rows, tail, generator=g) < 0.7
        visible[..., -1] = True
    return queries, packed_keys, packed_values, segment_lengths, tail_keys, tail_values, visible


CASES = [
    ([180, 78, 30], 3, 40, False),  # one segment per group (views)
    ([36, 130, 122], 3, 40, False),  # a padded group of consecutive segments
    ([23, 246, 19], 3, 33, False),  # a padded group of segments 0 and 2
    ([86, 89, 113], 7, 5, False),  # one padded group of every segment
    ([250, 19, 19], 3, 40, True),  # a run of equal segments, padded tail
    ([0, 12, 0, 40], 2, 4, True),  # empty segments
    ([64] * 6, 3, 9, False),  # uniform budgets: one group, one view
    ([300, 7, 150, 151, 90, 3, 0, 299], 6, 3, True),
    ([900, 900, *range(40, 40 + 29 * 20, 20)], 7, 12, False),  # a full row among compressed ones
    ([500, *(200 + (i * 37) % 150 for i in range(PIECEWISE_SEGMENTS + 3))], 2, 6, False),  # gather index
]


@pytest.mark.parametrize("lengths,rows,tail,padded_tail", CASES)
def test_planned_packed_attention_is_bit_identical_to_gathering_each_group(lengths, rows, tail, padded_tail):
    operands = random_case(lengths, rows, tail, padded_tail=padded_tail, seed=len(lengths))
    queries, packed_keys, packed_values, segment_lengths, tail_keys, tail_values, visible = operands
    plan = plan_packed(packed_keys, packed_values, segment_lengths, length_groups(segment_lengths))
    out = packed_attention(
        queries, packed_keys, packed_values, segment_lengths, plan, tail_keys, tail_values, visible, 0.25
    )
    expected = gathered_reference(*operands, 0.25)
    assert torch.equal(out, expected)
    unplanned = packed_attention(
        queries,
        packed_keys,
        packed_values,
        segment_lengths,
        length_groups(segment_lengths),
        tail_keys,
        tail_values,
        visible,
        0.25,
    )
    assert torch.equal(unplanned, expected)


def test_planned_packed_attention_in_bfloat16_is_bit_identical_too():
    operands = random_case([36, 130, 122, 5], 3, 20, seed=3, dtype=torch.bfloat16)
    queries, packed_keys, packed_values, segment_lengths, tail_keys, tail_values, visible = operands
    plan = plan_packed(packed_keys, packed_values, segment_lengths, length_groups(segment_lengths))
    out = packed_attention(
        queries, packed_keys, packed_values, segment_lengths, plan, tail_keys, tail_values, visible, 0.25
    )
    assert torch.equal(out, gathered_reference(*operands, 0.25))


def test_a_plan_made_for_other_tensors_is_not_used():
    first = random_case([30, 10, 20], 2, 4, seed=1)
    second = random_case([30, 10, 20], 2, 4, seed=2)
    stale = plan_packed(first[1], first[2], first[3], length_groups(first[3]))
    queries, packed_keys, packed_values, segment_lengths, tail_keys, tail_values, visible = second
    out = packed_attention(
        queries, packed_keys, packed_values, segment_lengths, stale, tail_keys, tail_values, visible, 0.25
    )
    assert torch.equal(out, gathered_reference(*second, 0.25))


def test_the_plan_holds_views_of_the_packed_tensors_only():
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([36, 130, 122, 0])
    packed_keys = torch.randn(int(lengths.sum()), 8, generator=g)
    packed_values = torch.randn(int(lengths.sum()), 8, generator=g)
    tail = torch.randn(2, 2, 5, 8, generator=g)
    layer = PackedCompressedLayer(
        packed_keys, packed_values, lengths, tail, tail.clone(), torch.ones(2, 5, dtype=torch.bool), 300
    )
    own = {packed_keys.untyped_storage().data_ptr(), packed_values.untyped_storage().data_ptr()}
    bias = layer.packed_plan.bias.untyped_storage().data_ptr()
    for group in layer.packed_plan.groups:
        views = [*(group.prefix or ()), *(piece for pieces in (group.pieces or ()) for piece in pieces)]
        for view in views:
            assert view.untyped_storage().data_ptr() in own | {bias}
    assert layer.packed_plan.bias.numel() == 2
    cache = DynamicCache()
    cache.layers.append(layer)
    assert kv_cache_bytes(cache) == sum(tensor.nbytes for tensor in layer.tensors())


def segment_by_segment(
    queries, packed_keys, packed_values, segment_lengths, tail_keys, tail_values, visible, scale
):
    """Softmax attention of each segment over its own packed entries and tail, one segment at a time
    in float64 on the CPU: the definition that packed attention computes."""
    queries, packed_keys, packed_values, tail_keys, tail_values = (
        t.cpu().double() for t in (queries, packed_keys, packed_values, tail_keys, tail_values)
    )
    ends = segment_lengths.cpu().cumsum(0).tolist()
    out = []
    for s, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        keys = torch.cat([packed_keys[start:end], tail_keys[s]])
        values = torch.cat([packed_values[start:end], tail_values[s]])
        logits = queries[s] @ keys.T * scale
        if visible is not None:
            tail_mask = visible[s].cpu().expand(queries.shape[1], -1)
            logits[:, end - start :] = logits[:, end - start :].masked_fill(~tail_mask, float("-inf"))
        out.append(logits.softmax(-1) @ values)
    return torch.stack(out)


@pytest.mark.device
@pytest.mark.parametrize(
    "dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)], ids=["float32", "bfloat16"]
)
@pytest.mark.parametrize("lengths,rows,tail,padded_tail", CASES)
def test_packed_attention_on_the_test_device_equals_attention_segment_by_segment(
    lengths, rows, tail, padded_tail, dtype, tolerance, device
):
    operands = random_case(lengths, rows, tail, padded_tail=padded_tail, seed=len(lengths), dtype=dtype)
    queries, packed_keys, packed_values, segment_lengths, tail_keys, tail_values, visible = (
        None if t is None else t.to(device) for t in operands
    )
    plan = plan_packed(packed_keys, packed_values, segment_lengths, length_groups(segment_lengths))
    out = packed_attention(
        queries, packed_keys, packed_values, segment_lengths, plan, tail_keys, tail_values, visible, 0.25
    )
    assert out.device.type == device.type and out.dtype == dtype
    expected = segment_by_segment(*operands, 0.25)
    assert (out.cpu().double() - expected).abs().max() <= tolerance
