"""More than one process with torch.distributed (`torchrun --nproc-per-node N -m diffmamba_interp snr ...`):
the examples of an analysis are sharded across the ranks, each rank computes its own, and the rows are
gathered so that every rank holds the whole result; only rank 0 writes files and prints tables, so a
run writes exactly what one process writes.

Backend: NCCL when CUDA is available (each rank on cuda:LOCAL_RANK), else gloo. A single process
(no WORLD_SIZE, or 1) never touches torch.distributed.
"""

from __future__ import annotations

import os

import torch

__all__ = ["world", "is_main", "shard", "gather"]


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


def shard(n: int) -> list[int]:
    """This rank's share of n items: indices rank, rank + world, … (all of them in one process)."""
    rank, size = world()
    return list(range(rank, n, size))


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] in one process)."""
    rank, size = world()
    if size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * size
    dist.all_gather_object(out, obj)
    return out
