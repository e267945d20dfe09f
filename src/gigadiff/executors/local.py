"""Running a backend over the tiles of one step on the local device, in batches of one fixed shape.

Every model call has exactly `batch_size` tiles: a partial last batch is filled with copies of its last tile,
whose predictions are dropped. A tile's prediction depends on the shape of the batch it is computed in (kernels
choose their blocking by shape), not on which other tiles share it (measured on CPU), so with one fixed shape
every tile comes out the same whichever tiles it was batched with: on one process, or on any share of any
number of processes (gigadiff.executors.distributed). The filler costs at most batch_size - 1 tiles per call
sequence, and the default batch never exceeds a step's tiles (gigadiff.grids.tile_batch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gigadiff.backends.base import Backend
from gigadiff.fusion import gather_tile
from gigadiff.geometry import Tile, TileGrid


@dataclass(frozen=True)
class Batch:
    """Predictions for `tiles` ([len(tiles) * B, C, h, w], grid order) and the model calls that made them."""

    tiles: Sequence[Tile]
    predictions: torch.Tensor
    calls: int


def gather_tiles(canvas: torch.Tensor, tiles: Sequence[Tile]) -> torch.Tensor:
    """Cut `tiles` out of a [B, C, H, W] canvas and stack them into [len(tiles) * B, C, h, w]."""
    return torch.cat([gather_tile(canvas, t) for t in tiles])


def padded(tiles: Sequence[Tile], size: int) -> list[Tile]:
    """`tiles` filled up to `size` with copies of the last one (every call has the same shape)."""
    return [*tiles, *[tiles[-1]] * (size - len(tiles))]


def run_batch(backend: Backend, canvas: torch.Tensor, t: Any, cond: Any, tiles: Sequence[Tile], size: int,
              branch: int | None = None) -> torch.Tensor:  # fmt: skip
    """Predictions for `tiles` (at most `size`), computed in one call of exactly `size` tiles."""
    full = padded(tiles, size)
    x = gather_tiles(canvas, full)
    out = backend.predict(x, t, cond, full) if branch is None else backend.predict_branch(x, t, cond, full, branch)
    return out[: len(tiles) * canvas.shape[0]]


class TileExecutor(Protocol):
    def predictions(self, backend: Backend, canvas: torch.Tensor, t: Any, cond: Any, grid: TileGrid) -> Iterator[Batch]:
        """Yield the predictions of every tile of `grid`, in the grid's canonical order."""
        ...


class LocalExecutor:
    """Runs tiles `batch_size` at a time on the backend's device, in grid order (so fusion adds them in the same
    order whatever the batch size)."""

    def __init__(self, batch_size: int = 4):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def predictions(self, backend: Backend, canvas: torch.Tensor, t: Any, cond: Any, grid: TileGrid) -> Iterator[Batch]:
        tiles = grid.tiles
        for start in range(0, len(tiles), self.batch_size):
            batch = tiles[start : start + self.batch_size]
            yield Batch(batch, run_batch(backend, canvas, t, cond, batch, self.batch_size), 1)
