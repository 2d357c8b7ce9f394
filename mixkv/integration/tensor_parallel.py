"""Recognising a model whose KV heads transformers' tensor parallelism split over ranks.

``from_pretrained(..., tp_plan="auto")`` under ``torchrun`` turns the projection weights into
``DTensor`` shards over a one-dimensional device mesh; each rank then caches ``Hkv / R`` KV heads of
every layer. :func:`find_head_shard` finds that mesh on the attention modules; the session checks on
the first attention call that the rank really holds its share of the heads
(:func:`check_local_heads`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mixkv.integration.decoder_layout import DecoderLayout
from mixkv.presses.head_shard import HeadShard


def find_head_shard(layout: DecoderLayout) -> HeadShard | None:
    """This rank's share of the KV heads when the attention weights are sharded, else None.

    Raises
    ------
    ValueError
        If the attention weights are sharded over a mesh of more than one dimension, or the KV
        heads do not split evenly over its ranks.
    """
    for module in layout.attention_modules:
        for parameter in module.parameters():
            mesh = _shard_mesh(parameter)
            if mesh is not None:
                if mesh.ndim != 1:
                    raise ValueError(
                        f"mixkv supports tensor parallelism over a one-dimensional device mesh; this model's "
                        f"attention weights are sharded over a {mesh.ndim}-dimensional one {tuple(mesh.shape)}"
                    )
                return HeadShard(
                    group=mesh.get_group(),
                    rank=mesh.get_local_rank(),
                    size=mesh.size(),
                    num_kv_heads=layout.num_kv_heads,
                    device=torch.device(mesh.device_type),
                )
    return None


def is_tensor_parallel(model: torch.nn.Module) -> bool:
    """Whether any of ``model``'s weights is a shard of a tensor-parallel plan."""
    return any(_shard_mesh(parameter) is not None for parameter in model.parameters())


def _shard_mesh(parameter: torch.Tensor) -> Any:
    """The device mesh over which ``parameter`` is sharded, or None (a whole tensor)."""
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(parameter, DTensor) and any(isinstance(p, Shard) for p in parameter.placements):
        return parameter.device_mesh
    return None


def refuse_tensor_parallel(model: torch.nn.Module, what: str, why: str) -> None:
    """Refuse ``what`` on a tensor-parallel model, saying ``why``.

    Raises
    ------
    ValueError
        If :func:`is_tensor_parallel`.
    """
    if is_tensor_parallel(model):
        raise ValueError(
            f"{what} is not supported on a tensor-parallel model (tp_plan): {why}; load the model "
            "without tp_plan (one process, or device_map='auto' to spread its layers over devices)"
        )


def check_local_heads(shard: HeadShard | None, keys: torch.Tensor) -> None:
    """Refuse a layer whose cached heads are not what :func:`find_head_shard` expects.

    Raises
    ------
    ValueError
        If ``keys`` ``(B, h, N, D)`` of a sharded model does not hold this rank's ``Hkv / R`` heads.
    """
    if shard is None or keys.shape[1] == shard.local_heads:
        return
    raise ValueError(
        f"a layer's cache holds {keys.shape[1]} KV heads on tensor-parallel rank {shard.rank} of {shard.size} "
        f"where {shard.local_heads} were expected: mixkv "
        "supports tensor-parallel plans that split the key/value projections column-wise over "
        "consecutive heads (transformers' tp_plan='auto'), not this model's plan"
    )
