"""The KV heads of a layer that this process holds when a model is split over ranks (tensor parallel).

Under transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``)
the key and value projections are split column-wise: with ``R`` ranks each rank computes, caches and
attends over ``Hkv / R`` consecutive KV heads of every layer, rank ``r`` heads
``[r Hkv / R, (r + 1) Hkv / R)``. Whatever depends on one head alone (scores, selection, uniform
budgets) needs nothing more; whatever allocates over all the heads of a layer (AdaKV, SparseMM, the
compression report) gathers the per-head values of every rank, computes on the whole layer, and
keeps this rank's share, so that each rank keeps exactly the entries a one-process run keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["HeadShard"]


@dataclass(frozen=True)
class HeadShard:
    """This rank's consecutive share of the KV heads of every layer, and the collectives over ranks.

    Attributes
    ----------
    group : ProcessGroup
        The tensor-parallel process group (the model's device mesh).
    rank, size : int
        This process's position in ``group`` and the number of ranks.
    num_kv_heads : int
        KV heads of a whole layer (the model's config); ``size`` divides it.
    device : torch.device, default CPU
        Where the group's collectives run (``cuda`` for NCCL); tensors travel there and back.
    """

    group: Any
    rank: int
    size: int
    num_kv_heads: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.size < 1 or self.num_kv_heads % self.size != 0:
            raise ValueError(
                f"the model's {self.num_kv_heads} KV heads cannot be split evenly over {self.size} "
                "tensor-parallel ranks: choose a number of ranks that divides the KV heads"
            )

    @property
    def local_heads(self) -> int:
        """KV heads of a layer held by this rank."""
        return self.num_kv_heads // self.size

    @property
    def heads(self) -> slice:
        """This rank's KV heads, as a slice of a whole layer's heads."""
        return slice(self.rank * self.local_heads, (self.rank + 1) * self.local_heads)

    def gather_heads(self, local: torch.Tensor, dim: int = 1, *, fill: float = 0.0) -> torch.Tensor:
        """All ranks' ``local`` tensors concatenated along the head axis ``dim``, in rank order.

        Ranks may differ in the size of the last axis (e.g. a head-wise compressed layer pads its
        heads to its own longest one): shorter tensors are padded on the left with ``fill``.
        """
        width = torch.tensor([local.shape[-1]], dtype=torch.long, device=self.device)
        widths = [torch.zeros_like(width) for _ in range(self.size)]
        dist.all_gather(widths, width, group=self.group)
        longest = int(torch.stack(widths).max())
        padded = local.to(self.device).contiguous()
        if local.shape[-1] < longest:
            padding = padded.new_full((*local.shape[:-1], longest - local.shape[-1]), fill)
            padded = torch.cat([padding, padded], dim=-1)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts, dim=dim).to(local.device)

    def sum(self, local: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``local`` over the ranks (a new tensor)."""
        total = local.to(self.device, copy=True)
        dist.all_reduce(total, group=self.group)
        return total.to(local.device)
