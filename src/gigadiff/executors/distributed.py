"""Tiles shared out over processes with torch.distributed (one process per GPU, launched by torchrun).

Every rank holds the same canvas, scheduler and seeded tile grid. The grid's tiles are cut into the same
batches a single process would use (`batch_size` tiles each, in canonical order); rank r runs an even,
contiguous share of those batches; the predictions are exchanged with one all_gather, and every rank then
fuses ALL tiles in canonical order, so every rank steps the same fused canvas.

Same image whatever the world size, and the same as a single-process run: every tile is computed in the same
batch, with the same shape, on every layout, and fusion adds tiles in one fixed order. (Measured on CPU: a
tile's prediction depends on its batch's shape, not on which process runs it.) Shares differ by at most one
batch.

With `cfg_split`, the unconditional and conditional halves of classifier-free guidance are separate units of
work (model calls of `batch_size` tiles each), so with two ranks one runs the unconditional passes and the other
the conditional ones; guidance is combined after the exchange, on every rank, in canonical order.

Faults: before each exchange the ranks meet at a monitored barrier on a gloo side group (also under NCCL); a
rank that died or hangs makes it fail within `timeout_s`, with an error naming the rank.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from gigadiff.backends.base import Backend
from gigadiff.executors.local import gather_tiles
from gigadiff.geometry import Tile, TileGrid


class RankFailure(RuntimeError):
    """A peer process died or stopped answering; the message names it."""


@dataclass
class ExchangeProfile:
    """Per-rank cost of the distributed loop: compute, communication, and bytes received."""

    compute_s: float = 0.0
    comm_s: float = 0.0
    bytes_exchanged: int = 0
    tiles: int = 0
    steps: int = 0
    per_step: list[dict[str, float]] = field(default_factory=list)


def share(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of n items; shares differ in size by at most one."""
    return range(rank * n // world, (rank + 1) * n // world)


def batches(n: int, batch_size: int) -> list[range]:
    """The canonical batches of tile indices: what a single process runs, in order."""
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@dataclass(frozen=True)
class Unit:
    """One model call: a canonical batch of tiles, and with CFG split, one guidance branch of it."""

    tiles: range
    branch: int | None = None


def units(n: int, batch_size: int, cfg_split: bool) -> list[Unit]:
    if not cfg_split:
        return [Unit(b) for b in batches(n, batch_size)]
    return [Unit(b, branch) for b in batches(n, batch_size) for branch in (0, 1)]


class DistributedExecutor:
    """Runs a rank's share of each step's tiles and exchanges predictions with the other ranks."""

    def __init__(self, batch_size: int = 4, timeout_s: float = 600.0, group: Any = None, cfg_split: bool = False):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedExecutor needs an initialised torch.distributed process group")
        self.batch_size = batch_size
        self.cfg_split = cfg_split
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        backend = dist.get_backend(group)
        self.health = group if backend == "gloo" else dist.new_group(backend="gloo", timeout=self.timeout)
        self.profile = ExchangeProfile()

    def _check_peers(self) -> None:
        try:
            dist.monitored_barrier(group=self.health, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as e:
            raise RankFailure(describe_failure(e, self.rank, self.timeout.total_seconds())) from e

    def predictions(
        self, backend: Backend, canvas: torch.Tensor, t: Any, cond: Any, grid: TileGrid
    ) -> Iterator[tuple[Sequence[Tile], torch.Tensor]]:
        tiles = grid.tiles
        n = len(tiles)
        split = self.cfg_split and getattr(cond, "uses_cfg", False)
        work = units(n, self.batch_size, split)
        shares = [share(len(work), r, self.world) for r in range(self.world)]
        started = time.perf_counter()
        outputs = []
        for unit in (work[i] for i in shares[self.rank]):
            picked = [tiles[i] for i in unit.tiles]
            x = gather_tiles(canvas, picked)
            if unit.branch is None:
                outputs.append(backend.predict(x, t, cond, picked))
            else:
                outputs.append(backend.predict_branch(x, t, cond, picked, unit.branch))  # type: ignore[attr-defined]
        b = canvas.shape[0]
        rows_of = [sum(len(work[i].tiles) for i in sh) * b for sh in shares]
        sendbuf = torch.zeros((max(rows_of), canvas.shape[1], tiles[0].h, tiles[0].w), dtype=torch.float32,
                              device=canvas.device)  # fmt: skip
        if outputs:
            local = torch.cat(outputs).to(canvas.device, torch.float32)
            sendbuf[: local.shape[0]] = local
        computed = time.perf_counter()
        self._check_peers()
        received = [torch.empty_like(sendbuf) for _ in range(self.world)]
        dist.all_gather(received, sendbuf, group=self.group)
        done = time.perf_counter()
        nbytes = sendbuf.numel() * 4 * (self.world - 1)
        self._record(computed - started, done - computed, nbytes, rows_of[self.rank] // b)
        ordered = torch.cat([received[r][: rows_of[r]] for r in range(self.world)])
        if split:  # rows are [uncond batch 0, cond batch 0, uncond batch 1, ...]: guide each batch
            parts = ordered.split([len(u.tiles) * b for u in work])
            ordered = torch.cat([backend.combine(parts[i], parts[i + 1], cond)  # type: ignore[attr-defined]
                                 for i in range(0, len(parts), 2)])  # fmt: skip
        yield tiles, ordered

    def _record(self, compute: float, comm: float, nbytes: int, tiles: int) -> None:
        p = self.profile
        p.compute_s += compute
        p.comm_s += comm
        p.bytes_exchanged += nbytes
        p.tiles += tiles
        p.steps += 1
        p.per_step.append({"compute_s": compute, "comm_s": comm, "bytes": float(nbytes)})


def describe_failure(error: BaseException, rank: int, timeout_s: float) -> str:
    """Turn torch's barrier error into a sentence naming the failed rank(s)."""
    import re

    text = str(error)
    failed = sorted({int(m) for m in re.findall(r"[Rr]anks? (\d+)", text)} - {rank})
    who = f"rank {', '.join(map(str, failed))}" if failed else "a peer rank"
    return (
        f"{who} stopped answering (died, or hung for more than {timeout_s:.0f}s); "
        f"rank {rank} is ending the job. Detail: {text.splitlines()[0][:300]}"
    )
