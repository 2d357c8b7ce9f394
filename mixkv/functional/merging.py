"""Merging evicted KV entries into kept ones (LOOK-M's pivotal merge).

Conventions as in :mod:`mixkv.functional.scores`: caches are ``(B, Hkv, N, D)``; a head's kept
entries are given as positions ``(B, Hkv, K)`` with a validity mask (heads may keep different
numbers of entries).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pivot_merge"]


def pivot_merge(
    keys: Tensor,
    values: Tensor,
    kept_index: Tensor,
    kept_valid: Tensor,
    real: Tensor,
) -> tuple[Tensor, Tensor]:
    r"""LOOK-M's pivotal merge: every evicted entry is folded into its most similar kept entry.

    Each real entry ``p`` that a head does not keep is assigned to the kept entry ``t`` of the same
    head whose key is closest in cosine similarity, ``t(p) = argmax_t cos(k_p, k_t)`` (ties to the
    first kept slot), computed on the original keys. With ``E_t`` the entries assigned to ``t``, the
    key and the value of ``t`` become (``x`` stands for ``k`` and ``v``)

    .. math::

        x_t' = \frac{1}{1 + |E_t|}\Big(x_t + \sum_{p \in E_t} \frac{x_p + x_t}{2}\Big)

    i.e. each evicted entry is first averaged with its pivot, and the pivot becomes the mean of
    itself and those pairs (``scatter_reduce(..., reduce="mean", include_self=True)`` in the LOOK-M
    code). Kept entries nothing is assigned to, and every evicted position, are returned unchanged.

    Parameters
    ----------
    keys, values : Tensor
        ``(B, Hkv, N, D)`` cache (post-rotary keys).
    kept_index : Tensor
        ``(B, Hkv, K)`` long positions each head keeps.
    kept_valid : Tensor
        ``(B, Hkv, K)`` bool, False for unused slots of heads keeping fewer than ``K``.
    real : Tensor
        ``(B, N)`` or ``(B, Hkv, N)`` bool, True for real (non-padding) entries; padding is never
        merged.

    Returns
    -------
    keys, values : Tensor
        New tensors of the input shapes and dtypes, merged at the kept positions (computed in
        float32, float64 for float64 inputs).
    """
    if keys.ndim != 4 or values.shape[:3] != keys.shape[:3]:
        raise ValueError(
            f"keys and values must be (batch, num_kv_heads, seq_len, head_dim) caches of one length, got "
            f"{tuple(keys.shape)} and {tuple(values.shape)}"
        )
    batch, kv_heads, seq_len, _ = keys.shape
    if kept_index.shape != kept_valid.shape or tuple(kept_index.shape[:2]) != (batch, kv_heads):
        raise ValueError("kept_index and kept_valid must both be (batch, num_kv_heads, K)")
    mask = real if real.dim() == 3 else real[:, None, :].expand(batch, kv_heads, seq_len)
    if tuple(mask.shape) != (batch, kv_heads, seq_len):
        raise ValueError(
            f"real must be (batch, seq_len) or (batch, num_kv_heads, seq_len), got {tuple(real.shape)}"
        )
    dtype = torch.float64 if keys.dtype == torch.float64 else torch.float32
    # Unused slots may repeat a kept position: count the valid slots at each position.
    kept_slots = torch.zeros(batch, kv_heads, seq_len, dtype=torch.long, device=keys.device)
    is_kept = kept_slots.scatter_add_(2, kept_index, kept_valid.long()) > 0
    evicted = mask & ~is_kept
    unit = F.normalize(keys.to(dtype), dim=-1)
    head_dim_k, head_dim_v = keys.shape[-1], values.shape[-1]
    kept_unit = unit.gather(2, kept_index.unsqueeze(-1).expand(-1, -1, -1, head_dim_k))
    similarity = (unit @ kept_unit.transpose(-1, -2)).masked_fill(~kept_valid[:, :, None, :], float("-inf"))
    target = similarity.argmax(-1)  # (B, Hkv, N): kept slot of each entry
    counts = torch.zeros(batch, kv_heads, kept_index.shape[2], dtype=dtype, device=keys.device)
    counts.scatter_add_(2, target, evicted.to(dtype))
    b_idx = torch.arange(batch, device=keys.device)[:, None, None].expand_as(kept_index)
    h_idx = torch.arange(kv_heads, device=keys.device)[None, :, None].expand_as(kept_index)
    merge = kept_valid & (counts > 0)

    def merged(x: Tensor, dim: int) -> Tensor:
        full = x.to(dtype)
        sums = torch.zeros(batch, kv_heads, kept_index.shape[2], dim, dtype=dtype, device=x.device)
        sums.scatter_add_(
            2, target.unsqueeze(-1).expand(-1, -1, -1, dim), full * evicted[..., None].to(dtype)
        )
        pivots = full.gather(2, kept_index.unsqueeze(-1).expand(-1, -1, -1, dim))
        new = (pivots * (1 + counts[..., None] / 2) + sums / 2) / (1 + counts[..., None])
        out = x.clone()
        out[b_idx[merge], h_idx[merge], kept_index[merge]] = new[merge].to(x.dtype)
        return out

    return merged(keys, head_dim_k), merged(values, head_dim_v)
