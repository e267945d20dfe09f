"""Running a backend over the tiles of one step on the local device, in batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from gigadiff.backends.base import Backend
from gigadiff.fusion import gather_tile
from gigadiff.geometry import Tile, TileGrid


def gather_tiles(canvas: torch.Tensor, tiles: Sequence[Tile]) -> torch.Tensor:
    """Cut `tiles` out of a [B, C, H, W] canvas and stack them into [len(tiles) * B, C, h, w]."""
    return torch.cat([gather_tile(canvas, t) for t in tiles])


class TileExecutor(Protocol):
    def predictions(
        self, backend: Backend, canvas: torch.Tensor, t: Any, cond: Any, grid: TileGrid
    ) -> Iterator[tuple[Sequence[Tile], torch.Tensor]]:
        """Yield (tiles, predictions) for every tile of `grid`, in the grid's canonical order."""
        ...


class LocalExecutor:
    """Runs tiles `batch_size` at a time on the backend's device.

    Tiles are yielded in grid order, so fusion adds them in the same order whatever the batch size.
    """

    def __init__(self, batch_size: int = 4):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def predictions(
        self, backend: Backend, canvas: torch.Tensor, t: Any, cond: Any, grid: TileGrid
    ) -> Iterator[tuple[Sequence[Tile], torch.Tensor]]:
        tiles = grid.tiles
        for start in range(0, len(tiles), self.batch_size):
            batch = tiles[start : start + self.batch_size]
            yield batch, backend.predict(gather_tiles(canvas, batch), t, cond, batch)
