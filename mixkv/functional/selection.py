"""Selection of the positions each KV head keeps (spec 4)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["select_top_per_head"]


def select_top_per_head(scores: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    r"""Indices of the ``counts[b, h]`` highest-scoring positions of every head, in original order.

    For row ``(b, h)`` with ``c = counts[b, h]``:

    .. math::

        S_{b,h} = \operatorname{top}_c \{ j : s_{b,h}(j) \}, \qquad
        \mathrm{indices}[b, h, :c] = \operatorname{sorted}(S_{b,h})

    Ties are broken toward the lower position (stable descending sort). ``-inf`` marks a position
    that is never selected. Rows are padded to ``K = max(counts)`` slots; a padding slot holds
    index ``0`` and ``valid`` False.

    Parameters
    ----------
    scores : Tensor
        ``(B, Hkv, P)`` floating scores, no NaN; ``-inf`` = not selectable.
    counts : Tensor
        ``(B, Hkv)`` integer number of positions to keep per head, each in
        ``[0, number of scores > -inf in its row]``.

    Returns
    -------
    indices : Tensor
        ``(B, Hkv, K)`` long positions, ascending within the first ``counts[b, h]`` slots.
    valid : Tensor
        ``(B, Hkv, K)`` bool, ``valid[b, h, k] = k < counts[b, h]``.
    """
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise TypeError("scores must be a floating-point torch.Tensor")
    if scores.ndim != 3:
        raise ValueError(
            f"scores must have shape (batch, num_kv_heads, prefix_len), got {tuple(scores.shape)}"
        )
    if (
        not isinstance(counts, Tensor)
        or counts.is_floating_point()
        or counts.is_complex()
        or counts.dtype == torch.bool
    ):
        raise TypeError("counts must be an integer torch.Tensor (e.g. dtype torch.long)")
    if tuple(counts.shape) != tuple(scores.shape[:2]):
        raise ValueError(
            f"counts must have shape (batch, num_kv_heads) = {tuple(scores.shape[:2])}, "
            f"got {tuple(counts.shape)}"
        )
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores must not contain NaN; use -inf for positions that cannot be selected")
    counts = counts.to(scores.device, torch.long)
    if bool((counts < 0).any()):
        raise ValueError("counts must be non-negative")
    selectable = (~torch.isneginf(scores)).sum(-1)
    if bool((counts > selectable).any()):
        raise ValueError(
            "a count exceeds the number of selectable (> -inf) scores of its row; cap counts at "
            "(scores > -inf).sum(-1)"
        )
    keep = int(counts.max()) if counts.numel() else 0
    best = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :keep]
    valid = torch.arange(keep, device=scores.device) < counts[..., None]
    beyond = scores.shape[-1]  # larger than every position: sorts padding slots last
    indices = best.masked_fill(~valid, beyond).sort(dim=-1).values
    return indices.masked_fill(~valid, 0), valid
