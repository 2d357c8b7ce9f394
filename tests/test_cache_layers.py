"""Attention over compressed layers equals attention over the full cache with dropped entries masked."""

import pytest
import torch
from transformers import DynamicCache

from mixkv import kv_cache_bytes
from mixkv.functional.attention import UNSPLIT_LENGTH, length_groups
from mixkv.integration.cache import DenseCompressedLayer, PackedCompressedLayer
from tests.reference import masked_reference


def random_full_cache(batch=2, kv_heads=2, length=40, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, length, head_dim, generator=g)
    values = torch.randn(batch, kv_heads, length, head_dim, generator=g)
    return keys, values


def build_packed(keys, values, kept, window, window_valid=None):
    """``kept``: (B, Hkv, N - W) bool of the prefix entries to keep."""
    batch, length = keys.shape[0], keys.shape[2]
    prefix = length - window
    if window_valid is None:
        window_valid = torch.ones(batch, window, dtype=torch.bool)
    return PackedCompressedLayer(
        keys[:, :, :prefix][kept],
        values[:, :, :prefix][kept],
        kept.sum(-1).flatten(),
        keys[:, :, prefix:].clone(),
        values[:, :, prefix:].clone(),
        window_valid,
        seen_tokens=length,
    )


def append_new_tokens(layer, keys, values, new, seed=1):
    g = torch.Generator().manual_seed(seed)
    batch, kv_heads, _, head_dim = keys.shape
    new_k = torch.randn(batch, kv_heads, new, head_dim, generator=g)
    new_v = torch.randn(batch, kv_heads, new, head_dim, generator=g)
    layer.update(new_k, new_v)
    return torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2)


@pytest.mark.parametrize("query_length", [1, 3])
def test_packed_layer_attention_equals_masked_full_attention(query_length):
    keys, values = random_full_cache()
    window = 6
    g = torch.Generator().manual_seed(2)
    kept = torch.rand(2, 2, keys.shape[2] - window, generator=g) < 0.4  # every head its own count
    layer = build_packed(keys, values, kept, window)
    full_k, full_v = append_new_tokens(layer, keys, values, query_length)
    query = torch.randn(2, 4, query_length, 8, generator=g)

    visible = torch.ones(2, 2, query_length, full_k.shape[2], dtype=torch.bool)
    visible[..., : kept.shape[-1]] = kept.unsqueeze(2)
    causal = torch.ones(query_length, query_length, dtype=torch.bool).tril()
    visible[..., -query_length:] &= causal
    expected = masked_reference(query, full_k, full_v, visible, 0.3)
    assert (layer.attend(query, 0.3) - expected).abs().max() <= 1e-5


def test_packed_layer_ignores_padding_inside_the_window():
    keys, values = random_full_cache(batch=2)
    window = 6
    kept = torch.zeros(2, 2, keys.shape[2] - window, dtype=torch.bool)
    kept[0, :, :5] = True
    window_valid = torch.ones(2, window, dtype=torch.bool)
    window_valid[1, :2] = False  # a sequence of 4 tokens, left padded
    layer = build_packed(keys, values, kept, window, window_valid)
    full_k, full_v = append_new_tokens(layer, keys, values, 1)
    query = torch.randn(2, 4, 1, 8, generator=torch.Generator().manual_seed(3))

    visible = torch.ones(2, 2, 1, full_k.shape[2], dtype=torch.bool)
    visible[..., : kept.shape[-1]] = kept.unsqueeze(2)
    visible[1, :, :, kept.shape[-1] : kept.shape[-1] + 2] = False
    expected = masked_reference(query, full_k, full_v, visible, 0.35)
    assert (layer.attend(query, 0.35) - expected).abs().max() <= 1e-5


def test_packed_layer_with_a_head_that_kept_no_prompt_entry():
    keys, values = random_full_cache(batch=1)
    window = 4
    kept = torch.zeros(1, 2, keys.shape[2] - window, dtype=torch.bool)
    kept[0, 0, 3:9] = True
    layer = build_packed(keys, values, kept, window)
    full_k, full_v = append_new_tokens(layer, keys, values, 1)
    query = torch.randn(1, 4, 1, 8, generator=torch.Generator().manual_seed(4))
    visible = torch.ones(1, 2, 1, full_k.shape[2], dtype=torch.bool)
    visible[..., : kept.shape[-1]] = kept.unsqueeze(2)
    expected = masked_reference(query, full_k, full_v, visible, 0.2)
    out = layer.attend(query, 0.2)
    assert torch.isfinite(out).all()
    assert (out - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("query_length", [1, 3])
def test_packed_layer_with_very_unequal_heads_attends_group_by_group_as_masked_full_attention(query_length):
    keys, values = random_full_cache(batch=2, length=406)
    window = 6
    kept = torch.zeros(2, 2, keys.shape[2] - window, dtype=torch.bool)
    kept[0, 0] = True  # the whole prompt (a full-cache row), 400 entries
    kept[0, 1, ::3] = True  # 134
    kept[1, 0, 50:60] = True  # 10
    layer = build_packed(keys, values, kept, window)  # row 1 head 1 keeps no prompt entry
    assert len(layer.length_groups) == 3
    full_k, full_v = append_new_tokens(layer, keys, values, query_length)
    query = torch.randn(2, 4, query_length, 8, generator=torch.Generator().manual_seed(6))

    visible = torch.ones(2, 2, query_length, full_k.shape[2], dtype=torch.bool)
    visible[..., : kept.shape[-1]] = kept.unsqueeze(2)
    visible[..., -query_length:] &= torch.ones(query_length, query_length, dtype=torch.bool).tril()
    expected = masked_reference(query, full_k, full_v, visible, 0.3)
    assert (layer.attend(query, 0.3) - expected).abs().max() <= 1e-5


def test_length_groups_hold_every_segment_once_and_pad_each_at_most_twofold():
    lengths = torch.tensor([400, 10, 0, 134, 260, 70, 64, 399, 3])
    groups = length_groups(lengths)
    members = torch.cat([segments for segments, _ in groups]).tolist()
    assert sorted(members) == list(range(len(lengths)))
    for segments, longest in groups:
        assert longest == int(lengths[segments].max())
        assert longest <= UNSPLIT_LENGTH or bool((2 * lengths[segments] > longest).all())


def test_equal_segment_lengths_stay_one_group():
    assert length_groups(torch.full((6,), 512)) == [(None, 512)]


@pytest.mark.parametrize("query_length", [1, 4])
def test_dense_layer_attention_equals_masked_full_attention(query_length):
    keys, values = random_full_cache()
    g = torch.Generator().manual_seed(5)
    positions = torch.stack([torch.randperm(40, generator=g)[:12].sort().values for _ in range(4)]).view(
        2, 2, 12
    )
    index = positions.unsqueeze(-1).expand(-1, -1, -1, 8)
    layer = DenseCompressedLayer(keys.gather(2, index), values.gather(2, index), seen_tokens=40)
    full_k, full_v = append_new_tokens(layer, keys, values, query_length)
    query = torch.randn(2, 4, query_length, 8, generator=g)

    visible = torch.zeros(2, 2, query_length, full_k.shape[2], dtype=torch.bool)
    visible[..., :40] = torch.zeros(2, 2, 40, dtype=torch.bool).scatter(2, positions, True).unsqueeze(2)
    visible[..., 40:] = torch.ones(query_length, query_length, dtype=torch.bool).tril()
    expected = masked_reference(query, full_k, full_v, visible, 0.25)
    assert (layer.attend(query, 0.25) - expected).abs().max() <= 1e-5


def test_compressed_layers_report_the_seen_length_for_positions():
    keys, values = random_full_cache()
    layer = DenseCompressedLayer(keys[:, :, :10].clone(), values[:, :, :10].clone(), seen_tokens=40)
    append_new_tokens(layer, keys, values, 2)
    assert layer.get_seq_length() == 42
    assert layer.get_mask_sizes(1) == (43, 0)


def test_kv_cache_bytes_counts_packed_entries_and_bookkeeping():
    keys, values = random_full_cache()
    window = 6
    kept = torch.zeros(2, 2, 34, dtype=torch.bool)
    kept[0, 0, :10] = kept[1, 1, :3] = True
    layer = build_packed(keys, values, kept, window)
    cache = DynamicCache()
    cache.layers.append(layer)
    entry = 8 * 4  # head_dim floats
    expected = 2 * 13 * entry + 4 * 8 + 2 * (2 * 2 * window * entry) + 2 * window
    assert kv_cache_bytes(cache) == expected


def test_kv_cache_bytes_charges_a_view_for_its_whole_storage():
    keys, values = random_full_cache(batch=1, kv_heads=1)
    cache = DynamicCache()
    cache.layers.append(DenseCompressedLayer(keys[:, :, :5], values[:, :, :5], seen_tokens=40))
    assert kv_cache_bytes(cache) == keys.nbytes + values.nbytes


def test_detached_compressed_layer_refuses_to_decode():
    keys, values = random_full_cache()
    layer = DenseCompressedLayer(keys, values, seen_tokens=40)
    layer.active = False
    with pytest.raises(RuntimeError, match="inside `with press"):
        layer.update(keys[:, :, :1], values[:, :, :1])
