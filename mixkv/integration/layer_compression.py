"""Compressing one layer: the press's head budgets and scores select what a new cache layer keeps.

The layer's entries are a prefix followed by the observation window (the newest ``window_size``
tokens). Each KV head keeps its budget's worth of the best-scored real prefix entries, and every
head keeps the window. The kept entries go into a :class:`~mixkv.integration.cache.DenseCompressedLayer`
when every head of every sequence keeps the same number, else into a
:class:`~mixkv.integration.cache.PackedCompressedLayer`.
"""

from __future__ import annotations

import torch

from mixkv.functional import select_top_per_head
from mixkv.integration.cache import CompressedLayer, DenseCompressedLayer, PackedCompressedLayer
from mixkv.presses.base import BasePress, ScoringContext


def compress_layer(
    press: BasePress, ctx: ScoringContext, compress_rows: torch.Tensor, seen_tokens: int
) -> tuple[CompressedLayer, tuple[torch.Tensor, torch.Tensor]]:
    """A layer holding the entries of ``ctx`` that ``press`` keeps, and the selection.

    Parameters
    ----------
    press : BasePress
        Decides the head budgets and the scores.
    ctx : ScoringContext
        The layer's entries (``keys``/``values`` ``(B, Hkv, N, D)``, newest last), their mask and
        the window's queries; ``ctx.lengths`` are the real tokens each sequence has seen.
    compress_rows : BoolTensor ``(B,)``
        Sequences to cut to their budget; the others keep every real entry.
    seen_tokens : int
        Positions the layer has seen (the new layer's length for the model).

    Returns
    -------
    layer : CompressedLayer
    selection : tuple of Tensor ``(B, Hkv, K)``
        The kept prefix positions and their validity (:func:`~mixkv.functional.select_top_per_head`).
    """
    keys, values = ctx.keys, ctx.values
    window = press.window_size
    length, head_dim = keys.shape[2], keys.shape[3]
    prefix = length - window
    head_mask = ctx.head_mask
    prefix_mask = head_mask[..., :prefix]
    # The window is the newest tokens, held densely by every head: its padding is per sequence.
    window_valid = head_mask[:, 0, prefix:]
    counts = torch.where(
        compress_rows.unsqueeze(-1), press.head_budgets(ctx).to(keys.device), ctx.lengths[:, None]
    )
    available = prefix_mask.sum(-1)
    prefix_counts = torch.minimum((counts - window_valid.sum(-1, keepdim=True)).clamp(min=0), available)
    scores = press.scores(ctx).float()
    # Sequences within their budget keep every real prompt token.
    scores = torch.where(compress_rows[:, None, None], scores, torch.zeros_like(scores))
    scores = scores.masked_fill(~prefix_mask, float("-inf"))
    indices, valid = select_top_per_head(scores, prefix_counts)
    gather_index = indices.unsqueeze(-1).expand(-1, -1, -1, head_dim)
    kept_keys = keys[:, :, :prefix].gather(2, gather_index)
    kept_values = values[:, :, :prefix].gather(2, gather_index)
    layer: CompressedLayer
    if bool((prefix_counts == prefix_counts.flatten()[0]).all()) and bool(window_valid.all()):
        layer = DenseCompressedLayer(
            torch.cat([kept_keys, keys[:, :, prefix:]], dim=2),
            torch.cat([kept_values, values[:, :, prefix:]], dim=2),
            seen_tokens=seen_tokens,
        )
    else:
        layer = PackedCompressedLayer(
            kept_keys[valid],
            kept_values[valid],
            prefix_counts.flatten().long(),
            keys[:, :, prefix:].clone(),
            values[:, :, prefix:].clone(),
            window_valid.clone(),
            seen_tokens=seen_tokens,
        )
    return layer, (indices, valid)
