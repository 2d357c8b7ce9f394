"""Reference computations the tests compare mixkv against (plain, loop-free, obviously correct)."""

import torch

from mixkv.integration.cache import DenseCompressedLayer, PackedCompressedLayer


def masked_reference(query, keys, values, visible, scaling):
    """Softmax attention over the full key set; ``visible`` is ``(B, Hkv, q, N)``; returns ``(B, q, H, D)``."""
    group = query.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)
    v = values.repeat_interleave(group, dim=1)
    logits = query @ k.transpose(-1, -2) * scaling
    logits = logits.masked_fill(~visible.repeat_interleave(group, dim=1), float("-inf"))
    return (logits.softmax(-1) @ v).transpose(1, 2)


def kept_positions(layer, full_keys):
    """Which prompt positions of ``full_keys`` ``(B, Hkv, N, D)`` a compressed layer still holds,
    found by matching key vectors exactly: ``(B, Hkv, N)`` bool."""
    batch, kv_heads, length, _ = full_keys.shape
    kept = torch.zeros(batch, kv_heads, length, dtype=torch.bool, device=full_keys.device)
    for b in range(batch):
        for h in range(kv_heads):
            if isinstance(layer, DenseCompressedLayer):
                held = layer.keys[b, h]
            elif isinstance(layer, PackedCompressedLayer):
                segment = b * kv_heads + h
                segments = torch.arange(
                    layer.segment_lengths.numel(), device=full_keys.device
                ).repeat_interleave(layer.segment_lengths)
                held = torch.cat([layer.packed_keys[segments == segment], layer.keys[b, h]])
            else:
                raise TypeError(type(layer).__name__)
            matches = (full_keys[b, h].unsqueeze(1) == held.unsqueeze(0)).all(-1)  # (N, held)
            kept[b, h] = matches.any(-1)
    return kept
