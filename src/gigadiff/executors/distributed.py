"""Tiles shared out over processes with torch.distributed (one process per GPU, launched by torchrun).

Every rank holds the same canvas, scheduler and seeded tile grid. Rank r takes an even, contiguous share of
the step's tiles (shares differ by at most one tile, so every rank works whenever there are at least as many
tiles as ranks) and runs them in calls of exactly `batch_size` tiles, the last one filled up with copies as on
a single process (gigadiff.executors.local); the predictions are exchanged with one all_gather, and every rank
then fuses ALL tiles in canonical order, so every rank steps the same fused canvas.

Same image whatever the world size, and the same as a single-process run: a tile's prediction depends on the
shape of its call, not on the other tiles in it (measured on CPU), every call has one shape on every layout,
and fusion adds tiles in one fixed order.

With `cfg_split`, the unconditional and conditional passes of classifier-free guidance are separate units of
work (calls of `batch_size` tiles of one pass each), so with two ranks one runs the unconditional passes and
the other the conditional ones; guidance is combined after the exchange, on every rank, in canonical order.

Faults: before each exchange the ranks meet at a monitored barrier on a gloo side group (also under NCCL); a
rank that died or hangs makes it fail within `timeout_s`, with an error naming the rank.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from gigadiff.backends.base import Backend
from gigadiff.errors import GigadiffError
from gigadiff.executors.local import Batch, run_batch
from gigadiff.geometry import TileGrid


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


@dataclass(frozen=True)
class Unit:
    """One tile's prediction, or with CFG split one guidance pass (branch) of it."""

    tile: int
    branch: int | None = None


def units(n: int, split: bool) -> list[Unit]:
    """The work of a step in canonical order: every tile, or every (tile, pass) with CFG split."""
    return [Unit(i, b) for i in range(n) for b in ((0, 1) if split else (None,))]


def calls(share_units: list[Unit], batch_size: int) -> list[tuple[int | None, list[int]]]:
    """A share's model calls: (branch, tile indices) of at most `batch_size` tiles of one pass each."""
    out: list[tuple[int | None, list[int]]] = []
    for branch in sorted({u.branch for u in share_units}, key=lambda b: -1 if b is None else b):
        tiles = [u.tile for u in share_units if u.branch == branch]
        out += [(branch, tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)]
    return out


def rank_predictions(backend: Backend, canvas: torch.Tensor, t: Any, cond: Any, grid: TileGrid, batch_size: int,
                     rank: int, world: int, split: bool = False) -> tuple[list[Unit], torch.Tensor, int]:  # fmt: skip
    """What rank `rank` of `world` computes in a step: its share of the work units, their predictions in that
    order ([len(share) * B, C, h, w]), and its model calls. Each call is `batch_size` tiles of one pass, the
    last one filled up with copies (as on a single process), so every unit comes out of a call of one shape."""
    tiles = grid.tiles
    work = units(len(tiles), split)
    mine = [work[i] for i in share(len(work), rank, world)]
    outputs: dict[Unit, torch.Tensor] = {}
    b = canvas.shape[0]
    own_calls = calls(mine, batch_size)
    for branch, picked in own_calls:
        out = run_batch(backend, canvas, t, cond, [tiles[i] for i in picked], batch_size, branch)
        for k, i in enumerate(picked):
            outputs[Unit(i, branch)] = out[k * b : (k + 1) * b]
    predictions = torch.cat([outputs[u] for u in mine]) if mine else canvas.new_zeros((0, *canvas.shape[1:]))
    return mine, predictions, len(own_calls)


def combined(backend: Backend, ordered: torch.Tensor, cond: Any, tiles: int, split: bool) -> torch.Tensor:
    """All ranks' predictions in canonical order as every tile's guided prediction (with CFG split, rows are
    [tile 0 uncond, tile 0 cond, tile 1 uncond, ...]: guidance is combined here, in that order)."""
    if not split:
        return ordered
    per_tile = ordered.view(tiles, 2, -1, *ordered.shape[1:])
    return backend.combine(per_tile[:, 0].flatten(0, 1), per_tile[:, 1].flatten(0, 1), cond)


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

    def predictions(self, backend: Backend, canvas: torch.Tensor, t: Any, cond: Any, grid: TileGrid) -> Iterator[Batch]:
        tiles = grid.tiles
        if self.cfg_split and backend.branches(cond) != 2:
            raise GigadiffError("{cfg_split} needs a model run with classifier-free guidance (guidance > 1)",
                                "cfg_split")  # fmt: skip
        split = self.cfg_split
        work = units(len(tiles), split)
        shares = [[work[i] for i in share(len(work), r, self.world)] for r in range(self.world)]
        started = time.perf_counter()
        b = canvas.shape[0]
        _, mine, _ = rank_predictions(backend, canvas, t, cond, grid, self.batch_size, self.rank, self.world, split)
        rows_of = [len(sh) * b for sh in shares]
        sendbuf = torch.zeros((max(rows_of), canvas.shape[1], tiles[0].h, tiles[0].w), dtype=torch.float32,
                              device=canvas.device)  # fmt: skip
        sendbuf[: mine.shape[0]] = mine.to(canvas.device, torch.float32)
        computed = time.perf_counter()
        self._check_peers()
        received = [torch.empty_like(sendbuf) for _ in range(self.world)]
        dist.all_gather(received, sendbuf, group=self.group)
        done = time.perf_counter()
        nbytes = sendbuf.numel() * 4 * (self.world - 1)
        self._record(computed - started, done - computed, nbytes, len(shares[self.rank]))
        ordered = torch.cat([received[r][: rows_of[r]] for r in range(self.world)])
        total_calls = sum(len(calls(sh, self.batch_size)) for sh in shares)
        yield Batch(tiles, combined(backend, ordered, cond, len(tiles), split), total_calls)

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
