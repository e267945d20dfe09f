"""Fusing per-tile model predictions into one canvas-sized prediction.

Each tile's prediction is multiplied by a weight window and accumulated; dividing by the accumulated weights
makes the effective weights a partition of unity (they sum to one at every canvas pixel). Windows are
strictly positive, so every covered pixel has a non-zero denominator, including pixels at the canvas edge
that only one tile reaches.

- uniform: equal weights, MultiDiffusion (Bar-Tal et al., 2023).
- gaussian: a centred Gaussian with variance 0.01 in tile-normalised units, Mixture of Diffusers
  (Jiménez, 2023): the centre of a tile is trusted more than its borders.
- cosine: a raised-cosine (Hann) window sampled at pixel centres, which never reaches zero.
- linear: a tent, the distance to the nearest tile edge (beyond the damped rim). Where two tiles overlap,
  normalising makes each one's share fall linearly across the whole overlap, whatever its width: the
  gentlest cross-fade there is (least squared weight gradient), where the Gaussian hands over within a few
  pixels in the middle of the overlap. On the terrain model, whose last-step tiles still disagree, the
  Gaussian's hand-over line carries 1.6-1.9x the mean gradient energy, the tent's 1.3-1.6x (bench/terrain_seams.py).

Some models produce unreliable values in a thin rim along their input's edges. A window with `margin` > 0
multiplies its weight within `margin` pixels of the tile edge by RIM_FACTOR, so a rim counts only where no
other tile covers the pixel (along the canvas border), and otherwise the neighbour's interior wins.

Accumulation is done in float32 whatever the model's dtype, in the order tiles are added, so a fixed
canonical order gives bit-identical results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

from gigadiff.geometry import Tile, wrapped_pieces

WEIGHT_KINDS = ("uniform", "gaussian", "cosine", "linear")
GAUSSIAN_VARIANCE = 0.01
RIM_FACTOR = 1e-6


def _profile(kind: str, n: int) -> list[float]:
    if kind == "uniform":
        return [1.0] * n
    if kind == "gaussian":
        mid = (n - 1) / 2
        return [math.exp(-((i - mid) ** 2) / (n * n) / (2 * GAUSSIAN_VARIANCE)) for i in range(n)]
    if kind == "cosine":
        return [math.sin(math.pi * (i + 0.5) / n) ** 2 for i in range(n)]
    if kind == "linear":
        return [min(i, n - 1 - i) + 0.5 for i in range(n)]
    raise ValueError(f"unknown weight window {kind!r}; choose one of {', '.join(WEIGHT_KINDS)}")


def _axis_profile(kind: str, n: int, margin: int) -> torch.Tensor:
    profile = torch.tensor(_profile(kind, n), dtype=torch.float64)
    m = min(margin, (n - 1) // 2)
    if kind == "linear":  # the tent starts where the rim ends, so the cross-fade begins at zero there
        profile = (profile - m).clamp_min(0.5)
    if m > 0:
        profile[:m] *= RIM_FACTOR
        profile[n - m :] *= RIM_FACTOR
    return profile


@lru_cache(maxsize=64)
def _window_cpu(kind: str, h: int, w: int, margin: int) -> torch.Tensor:
    return torch.outer(_axis_profile(kind, h, margin), _axis_profile(kind, w, margin)).to(torch.float32)


def weight_window(kind: str, h: int, w: int, device: torch.device | str = "cpu", margin: int = 0) -> torch.Tensor:
    """A strictly positive [h, w] float32 weight window of the given kind, rims of `margin` px damped."""
    return _window_cpu(kind, h, w, margin).to(device)


def gather_tile(canvas: torch.Tensor, tile: Tile) -> torch.Tensor:
    """The window `tile` of a [B, C, H, W] canvas; a tile crossing the edge of a wrapped canvas is reassembled."""
    h, w = canvas.shape[-2:]
    if tile.y + tile.h <= h and tile.x + tile.w <= w:
        return canvas[(..., *tile.slices)]
    out = canvas.new_empty((*canvas.shape[:-2], tile.h, tile.w))
    for inside, on_canvas in wrapped_pieces(tile, h, w):
        out[(..., *inside)] = canvas[(..., *on_canvas)]
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
