"""The tensors of one decoder layer that the session hands from the attention call to compression.

:class:`AttentionCall` is what a layer's attention function was given in a forward (also what a
recorded prompt keeps per layer); :class:`HeldLayer` is everything the layer's cache holds at its
end, with the mask of its real entries, whichever kind of layer holds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from mixkv.integration.cache import CompressedLayer
from mixkv.presses.base import LayerInputs


@dataclass(frozen=True)
class AttentionCall:
    """One layer's attention call in a forward, as the session sees it.

    Attributes
    ----------
    layer_idx : int
        Index of the layer in the decoder.
    query : Tensor ``(B, H, Q, D)``
        The forward's post-rotary queries (a recorded prompt keeps only its last ``window``).
    keys, values : Tensor ``(B, Hkv, N, D)``
        What the attention attended over: everything the layer held after the cache update, for a
        dynamic layer.
    attention_mask : Tensor or None
        The model's attention mask (4-D, bool for sdpa or additive float for eager).
    scaling : float
        The attention module's logit scale.
    rotary : tuple of Tensor ``(B, Q, r)``, optional
        The cos and sin tables the module rotated the queries with (its ``position_embeddings``),
        when it was given them for every query.
    layer_inputs : LayerInputs, optional
        The attention module's inputs in a prompt forward, for presses that score from them.
    """

    layer_idx: int
    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    layer_inputs: LayerInputs | None = None


@dataclass(frozen=True)
class HeldLayer:
    """Every entry a layer holds, the newest tokens last.

    Attributes
    ----------
    keys, values : Tensor ``(B, Hkv, N, D)``
    key_mask : BoolTensor ``(B, N)`` or ``(B, Hkv, N)``
        True for real entries; per KV head for a head-wise compressed layer.
    seen_tokens : int
        Positions the layer has seen (the length a full cache would have).
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_mask: torch.Tensor
    seen_tokens: int


def held_layer(layer: Any, call: AttentionCall) -> HeldLayer:
    """What ``layer`` holds at the end of ``call``.

    Raises
    ------
    ValueError
        If the layer is neither a mixkv compressed layer nor a plain ``DynamicLayer``.
    """
    if isinstance(layer, CompressedLayer):
        keys, values, key_mask = layer.entries()
        return HeldLayer(keys, values, key_mask, layer.seen_tokens)
    if type(layer) is not DynamicLayer:
        raise ValueError(
            f"mixkv compresses DynamicCache layers; this layer is a {type(layer).__name__} "
            "(use the default dynamic cache, not a static or quantized one)"
        )
    keys = call.keys
    length = keys.shape[2]
    key_mask = key_mask_from_attention_mask(call.attention_mask, keys.shape[0], length, keys.device)
    return HeldLayer(keys, call.values, key_mask, length)


def key_mask_from_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """Real-token mask ``(B, N)`` of the prompt, read off the model's prefill attention mask.

    The last prompt token may attend to every real token, so the last query row of a 4-D mask (bool
    for sdpa, additive float for eager) is exactly the padding mask.

    Raises
    ------
    ValueError
        If the mask is neither 2-D nor 4-D, or does not cover ``length`` keys.
    """
    if attention_mask is None:
        return torch.ones((batch, length), dtype=torch.bool, device=device)
    if attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, :]
    elif attention_mask.dim() == 2:
        row = attention_mask
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(attention_mask.shape)}")
    if row.shape[-1] != length:
        raise ValueError(f"attention mask covers {row.shape[-1]} keys but the cache holds {length}")
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2 if row.is_floating_point() else row != 0
    return row.to(device).expand(batch, length)
