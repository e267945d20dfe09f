"""Process-group setup for runs started by torchrun (or any launcher that sets RANK / WORLD_SIZE).

`torchrun --nproc-per-node N -m gigadiff generate ...` starts N copies of the same command; each calls
`init_from_env`, which joins the group (NCCL when every rank has a GPU, gloo otherwise), pins the rank to
cuda:LOCAL_RANK, and tells the rest of the program who it is. Multi-node torchrun works the same way.
Torch is imported by the functions that need it, so a plain process checks its request without it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False
    """Part of a process group (a torchrun launch, even of one process)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True when started by torchrun (or another launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: str = "auto", timeout_s: float = 600.0) -> Ranks:
    """Join the process group described by the environment; a plain single process needs no group."""
    if not launched():
        return Ranks()
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, distributed=True)


def rank_device(device: str, ranks: Ranks) -> str:
    """The device string for this rank: each rank of a GPU run gets its own GPU."""
    import torch

    if ranks.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank}"
    return device


def from_main(value: Any, ranks: Ranks) -> Any:
    """Rank 0's `value` on every rank (seeds drawn at random, verdicts of checks only rank 0 can make)."""
    if not ranks.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
