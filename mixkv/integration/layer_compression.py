"""Compressing one layer: the press's head budgets and scores select what a new cache layer keeps.

The layer's entries are a prefix followed by the observation window (the newest ``window_size``
tokens). Each KV head keeps its budget's worth of the best-scored real prefix entries, and every
head keeps the window. The kept entries go into a :class:`~mixkv.integration.cache.DenseCompressedLayer`
when every head of every sequence keeps the same number, else into a
:class:`~mixkv.integration.cache.PackedCompressedLayer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixkv.functional import select_top_per_head
from mixkv.integration.cache import CompressedLayer, DenseCompressedLayer, PackedCompressedLayer
from mixkv.presses.base import BasePress, ScoringContext


@dataclass(frozen=True)
class KeptEntries:
    """Which entries of a layer a press keeps (:func:`select_kept_entries`).

    Attributes
    ----------
    indices, valid : Tensor ``(B, Hkv, K)``
        The kept prefix positions of every head, ascending, and their validity
        (:func:`~mixkv.functional.select_top_per_head`).
    prefix_counts : LongTensor ``(B, Hkv)``
        Prefix entries each head keeps.
    window_valid : BoolTensor ``(B, W)``
        Real tokens of the observation window (the newest ``W`` entries), which every head keeps.
    """

    indices: torch.Tensor
    valid: torch.Tensor
    prefix_counts: torch.Tensor
    window_valid: torch.Tensor


def select_kept_entries(press: BasePress, ctx: ScoringContext, compress_rows: torch.Tensor) -> KeptEntries:
    """The entries of ``ctx`` that ``press`` keeps: each KV head's budget's worth of the best-scored
    real prefix entries, and the observation window.

    ``compress_rows`` ``(B,)`` are the sequences to cut to their budget; the others keep every real
    entry.
    """
    keys = ctx.keys
    prefix = keys.shape[2] - press.window_size
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
    return KeptEntries(indices, valid, prefix_counts, window_valid)


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
    prefix, head_dim = keys.shape[2] - press.window_size, keys.shape[3]
    kept = select_kept_entries(press, ctx, compress_rows)
    indices, valid, prefix_counts, window_valid = (
        kept.indices,
        kept.valid,
        kept.prefix_counts,
        kept.window_valid,
    )
    merged = press.merge_evicted(ctx, indices, valid)
    if merged is not None:  # a merging press (LOOK-M) changes the kept entries, not which are kept
        keys, values = merged
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
