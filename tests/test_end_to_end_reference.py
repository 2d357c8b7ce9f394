"""End to end: decoding from a compressed cache gives the logits of the full cache with the dropped
entries masked out.

A one-layer model with a single KV head makes the reference expressible with transformers' own
4-D attention mask (one kept set per sequence), so the whole forward pass - rotary positions,
attention, MLP, head - is compared, not only the attention kernel.
"""

import pytest
import torch
from transformers import DynamicCache

import mixkv
from tests.helpers_tiny import random_llama
from tests.reference import kept_positions

WINDOW = 8
BUDGET = 40


def one_layer_mqa(attn_implementation):
    return random_llama(
        128,
        layers=1,
        kv_heads=1,
        attn_implementation=attn_implementation,
        initializer_range=0.2,
        pad_token_id=0,
    )


def batch(short_row_length):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (2, 100), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, : 100 - short_row_length] = 0
    ids[1, : 100 - short_row_length] = 0
    return ids, mask


PRESSES = [
    mixkv.SnapKVPress(budget=BUDGET, window_size=WINDOW),
    mixkv.AdaKVPress(budget=BUDGET, window_size=WINDOW),
    mixkv.MixKVPress(budget=BUDGET, window_size=WINDOW, base="snapkv"),
    mixkv.StreamingLLMPress(budget=BUDGET, window_size=WINDOW),
]


#: Largest logit difference to the reference: float32 differs by rounding only; bfloat16 rounds
#: every activation to 8 bits of mantissa and the two paths round differently (up to 0.08 measured
#: on the CPU, where attending to one wrong entry set moves the logits by 3-5).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25}


def decode_after_compression(press, short_row_length, attn_implementation, device, dtype):
    """Decode 3 tokens after a 2-row batch prefilled under ``press``, and after the full cache with a
    mask showing only the kept entries: ``(kept, got, expected)``."""
    model = one_layer_mqa(attn_implementation).to(device=device, dtype=dtype)
    ids, mask = (t.to(device) for t in batch(short_row_length))
    new_ids = torch.randint(1, 128, (2, 3), generator=torch.Generator().manual_seed(4)).to(device)
    positions = torch.arange(100, 103, device=device).expand(2, -1)

    full = DynamicCache(config=model.config)
    model(ids, attention_mask=mask, past_key_values=full)
    compressed = DynamicCache(config=model.config)
    with press(model):
        model(ids, attention_mask=mask, past_key_values=compressed)
        kept = kept_positions(compressed.layers[0], full.layers[0].keys)[:, 0] & mask.bool()
        got = model(new_ids, position_ids=positions, past_key_values=compressed).logits

    visible = torch.cat(
        [kept.unsqueeze(1).expand(-1, 3, -1), torch.ones(2, 3, 3, dtype=torch.bool, device=device).tril()], -1
    )
    if attn_implementation == "sdpa":
        reference_mask = visible[:, None]
    else:
        reference_mask = torch.zeros(visible.shape, device=device, dtype=dtype)
        reference_mask = reference_mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]
    expected = model(
        new_ids, attention_mask=reference_mask, position_ids=positions, past_key_values=full
    ).logits
    return kept, got.float(), expected.float()


@pytest.mark.device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("short_row_length", [80, 30], ids=["dense-layout", "packed-layout"])
@pytest.mark.parametrize("press", PRESSES, ids=lambda p: type(p).__name__)
def test_decoding_logits_equal_full_cache_with_dropped_entries_masked(
    press, short_row_length, attn_implementation, dtype, device
):
    kept, got, expected = decode_after_compression(
        press, short_row_length, attn_implementation, device, dtype
    )
    assert int(kept[0].sum()) == BUDGET
    assert int(kept[1].sum()) == min(BUDGET, short_row_length)
    assert (got - expected).abs().max() <= TOLERANCE[dtype]
