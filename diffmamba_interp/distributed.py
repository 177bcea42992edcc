"""More than one process with torch.distributed (`torchrun --nproc-per-node N -m diffmamba_interp snr ...`):
the work of an analysis is sharded across the ranks (the examples of `snr`, `compare`, `eval`; the
patched cells of `patch`), each rank computes its own share, and the rows are gathered so that every
rank holds the whole result in the single-process order; only rank 0 writes files and prints tables,
so a run writes what one process writes.

Backend: NCCL when CUDA is available (each rank on cuda:LOCAL_RANK), else gloo. A single process
(no WORLD_SIZE, or 1) never touches torch.distributed.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

__all__ = ["world", "is_main", "shard", "gather", "gather_rows"]


def world() -> tuple[int, int]:
    """(rank, world size); initialises the process group on first use under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return world()[0] == 0


def shard(n: int, sizes: Sequence[int] | None = None) -> list[int]:
    """This rank's share of n items, ascending: indices rank, rank + world, … (all of them in one process).
    sizes: each item's cost (e.g. its token count): the items are dealt in order of size instead, so
    every rank gets a like share of the long and the short ones."""
    rank, size = world()
    if sizes is None:
        return list(range(rank, n, size))
    order = sorted(range(n), key=lambda i: sizes[i])  # stable
    return sorted(order[rank::size])


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] in one process)."""
    rank, size = world()
    if size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def gather_rows(mine: Sequence, *columns) -> None:
    """Every rank's rows into every rank's `columns`, in place: each column (a numpy array, a list or a
    dict, indexed by item) holds this rank's rows at its items `mine` (from `shard`); afterwards it
    holds every item's row where one process would have put it. Nothing to do in one process."""
    if world()[1] == 1:
        return
    mine = list(mine)
    own = [c[mine] if isinstance(c, np.ndarray) else [c[i] for i in mine] for c in columns]
    for part, rows in gather((mine, own)):
        for col, values in zip(columns, rows):
            if isinstance(col, np.ndarray):
                col[part] = values
            else:
                for i, v in zip(part, values):
                    col[i] = v
