"""Fusing per-tile model predictions into one canvas-sized prediction.

Each tile's prediction is multiplied by its weight window (gigadiff.windows) and accumulated; dividing by the
accumulated weights makes the effective weights a partition of unity (they sum to one at every canvas pixel).

Accumulation is done in float32 whatever the model's dtype, in the order tiles are added, so a fixed
canonical order gives bit-identical results.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from gigadiff.geometry import Tile, wrapped_pieces
from gigadiff.windows import WEIGHT_KINDS, axis_profile


@lru_cache(maxsize=64)
def _window_cpu(kind: str, h: int, w: int, margin: int) -> torch.Tensor:
    rows = torch.tensor(axis_profile(kind, h, margin), dtype=torch.float64)
    cols = torch.tensor(axis_profile(kind, w, margin), dtype=torch.float64)
    return torch.outer(rows, cols).to(torch.float32)


def weight_window(kind: str, h: int, w: int, device: torch.device | str = "cpu", margin: int = 0) -> torch.Tensor:
    """A strictly positive [h, w] float32 weight window of the given kind, rims of `margin` px damped."""
    return _window_cpu(kind, h, w, margin).to(device)


def gather_tile(canvas: torch.Tensor, tile: Tile) -> torch.Tensor:
    """The window `tile` of a [B, C, H, W] canvas; a tile crossing the edge of a wrapped canvas is reassembled."""
    h, w = canvas.shape[-2:]
    if tile.y + tile.h <= h and tile.x + tile.w <= w:
        rows, cols = tile.slices
        return canvas[..., rows, cols]
    out = canvas.new_empty((*canvas.shape[:-2], tile.h, tile.w))
    for (in_rows, in_cols), (rows, cols) in wrapped_pieces(tile, h, w):
        out[..., in_rows, in_cols] = canvas[..., rows, cols]
    return out


class FusionAccumulator:
    """Weighted sum of tile predictions over a canvas of shape [B, C, H, W]."""

    def __init__(self, shape: Sequence[int], kind: str, device: torch.device | str = "cpu", margin: int = 0):
        if kind not in WEIGHT_KINDS:
            raise ValueError(f"unknown weight window {kind!r}; choose one of {', '.join(WEIGHT_KINDS)}")
        self.kind = kind
        self.margin = margin
        self.device = torch.device(device)
        self.numerator = torch.zeros(tuple(shape), dtype=torch.float32, device=self.device)
        self.denominator = torch.zeros(tuple(shape[-2:]), dtype=torch.float32, device=self.device)

    def add(self, tile: Tile, prediction: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate one tile's prediction, shaped [B, C, tile.h, tile.w]; a canvas-sized [H, W] `mask`
        scales its weights per pixel (regional prompts: the region's share of each pixel)."""
        window = weight_window(self.kind, tile.h, tile.w, self.device, self.margin)
        if mask is not None:
            window = window * gather_tile(mask.to(self.device), tile)
        weighted = prediction.to(self.device, torch.float32) * window
        for (ty, tx), (cy, cx) in wrapped_pieces(tile, *self.denominator.shape):
            self.numerator[..., cy, cx] += weighted[..., ty, tx]
            self.denominator[cy, cx] += window[ty, tx]

    def add_batch(self, tiles: Sequence[Tile], predictions: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate a batch of predictions, shaped [len(tiles) * B, C, h, w] grouped by tile."""
        for tile, pred in zip(tiles, predictions.chunk(len(tiles)), strict=True):
            self.add(tile, pred, mask)

    def result(self) -> torch.Tensor:
        if bool((self.denominator <= 0).any()):
            raise RuntimeError("fusion: some canvas pixels were not covered by any tile")
        return self.numerator / self.denominator


def fuse(
    tiles: Sequence[Tile], predictions: torch.Tensor, shape: Sequence[int], kind: str, margin: int = 0
) -> torch.Tensor:
    """Fuse predictions for `tiles` (one [B, C, h, w] block per tile) into a canvas of `shape`."""
    acc = FusionAccumulator(shape, kind, predictions.device, margin)
    acc.add_batch(tiles, predictions)
    return acc.result()
