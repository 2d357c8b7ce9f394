"""Data-parallel grids: the processes of ``torchrun`` or ``accelerate launch`` share a grid's examples.

A grid launched as ``torchrun --nproc_per_node N -m mixkv eval ...`` (or ``accelerate launch
--num_processes N -m mixkv eval ...``) runs in N processes that coordinate through
``torch.distributed``: this module finds the launch (the ``RANK`` / ``WORLD_SIZE`` variables the
launchers set, or a process group already initialised), opens a gloo process group when none is
open (gloo runs on CPUs and is only used to exchange the plan and the records, never tensors of
the model), and gives each process its share of every (task, context length)'s examples: example
``i`` belongs to rank ``i mod N``, so every cell of one example runs in the same process and keeps
its shared prefix and replayed prefill. The grid engine (:mod:`mixkv.eval.grid`) does the rest.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DataParallel", "data_parallel", "grid_differences"]

#: How long a rank waits for the others at a collective (the end of a grid waits for the slowest
#: rank's share, which can take hours on a long grid); only for the process group opened here.
WAIT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel grid (``rank`` 0 of 1: one process).

    Attributes
    ----------
    rank
        This process's rank, 0 to ``world_size - 1``; rank 0 plans the grid and writes its files.
    world_size
        How many processes share the grid's examples.
    """

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {self.rank} of {self.world_size}.")

    @property
    def is_main(self) -> bool:
        """Whether this process plans the grid and writes its cell files and reports."""
        return self.rank == 0

    def share(self, n: int) -> range:
        """The example indices of ``0 .. n-1`` this rank computes: ``i`` with ``i mod world_size == rank``."""
        return range(self.rank, n, self.world_size)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order, on rank 0; None on the others."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, gathered, dst=0)
        return gathered

    def check_same_grid(self, description: dict[str, Any]) -> None:
        """Raise ValueError on every rank unless every rank was given the grid ``description``
        (what a rank computes and where it writes; see :func:`grid_differences`)."""
        if self.world_size == 1:
            return
        descriptions: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(descriptions, description)
        problem = grid_differences(descriptions)
        if problem is not None:
            raise ValueError(problem)


def grid_differences(descriptions: Sequence[dict[str, Any]]) -> str | None:
    """Why the ranks' grid ``descriptions`` (in rank order) are not one grid, or None when they are."""
    first = descriptions[0]
    for rank, description in enumerate(descriptions[1:], start=1):
        keys = sorted(k for k in {**first, **description} if first.get(k) != description.get(k))
        if keys:
            return (
                f"Rank {rank} was given another grid than rank 0: "
                + ", ".join(f"{k}={description.get(k)!r} (rank 0: {first.get(k)!r})" for k in keys)
                + ". Give every process of a data-parallel run the same arguments."
            )
    return None


@contextlib.contextmanager
def data_parallel() -> Iterator[DataParallel]:
    """This process's place in the launch it belongs to.

    An initialised ``torch.distributed`` process group is used as it is. Otherwise ``WORLD_SIZE``
    above 1 (set by ``torchrun`` and ``accelerate launch``) opens a gloo group for the duration of
    the block, from the launcher's ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without it the
    process is rank 0 of 1.

    Raises
    ------
    ValueError
        ``WORLD_SIZE`` or ``RANK`` is not a number, or ``RANK`` is missing while ``WORLD_SIZE`` is
        above 1 (start the processes with ``torchrun`` or ``accelerate launch``).
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        yield DataParallel(dist.get_rank(), dist.get_world_size())
        return
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ["RANK"]) if world_size > 1 else 0
    except KeyError:
        raise ValueError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but RANK is not set: start a data-parallel grid "
            "with torchrun or accelerate launch, which set both."
        ) from None
    except ValueError:
        raise ValueError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} and RANK={os.environ.get('RANK')!r} must be whole "
            "numbers (as torchrun and accelerate launch set them)."
        ) from None
    if world_size <= 1:
        yield DataParallel()
        return
    if not dist.is_available():
        raise ValueError("WORLD_SIZE is above 1 but this torch has no torch.distributed: run one process.")
    dist.init_process_group(backend="gloo", rank=rank, world_size=world_size, timeout=WAIT)
    try:
        yield DataParallel(rank, world_size)
    finally:
        dist.destroy_process_group()
