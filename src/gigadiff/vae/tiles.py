"""Tiles of a tiled pass, in and out: the crop a tile is computed from (its core with a halo of context), and the
sinks its output goes to (streamed to a writer, or collected into one tensor for images that fit in memory)."""

from __future__ import annotations

from collections.abc import Callable

import torch

TileSink = Callable[[int, int, torch.Tensor], None]
"""Receives (y0, x0, tile [B, C, h, w]) for each tile of a pass's output, in row-major tile order."""


def crop_with_halo(x: torch.Tensor, y0: int, y1: int, x0: int, x1: int, halo: int,
                   wrap: tuple[bool, bool]) -> tuple[torch.Tensor, tuple[int, int]]:  # fmt: skip
    """x[..., y0-halo:y1+halo, x0-halo:x1+halo]: clipped at the image edge, or taken around it in wrap mode.

    Returns the crop and the offset (top, left) of [y0, x0] inside it.
    """
    h, w = x.shape[2:]

    def axis(a: int, b: int, size: int, wraps: bool) -> tuple[torch.Tensor, int]:
        if wraps:
            return torch.arange(a - halo, b + halo).remainder(size), halo
        lo, hi = max(0, a - halo), min(size, b + halo)
        return torch.arange(lo, hi), a - lo

    rows, top = axis(y0, y1, h, wrap[0])
    cols, left = axis(x0, x1, w, wrap[1])
    return x.index_select(2, rows).index_select(3, cols), (top, left)


class Collector:
    """A sink that assembles streamed tiles into one tensor (for images that fit in memory)."""

    def __init__(self) -> None:
        self.parts: list[tuple[int, int, torch.Tensor]] = []

    def __call__(self, y0: int, x0: int, tile: torch.Tensor) -> None:
        self.parts.append((y0, x0, tile.float().cpu()))

    @property
    def image(self) -> torch.Tensor:
        h = max(y0 + t.shape[2] for y0, _, t in self.parts)
        w = max(x0 + t.shape[3] for _, x0, t in self.parts)
        b, c = self.parts[0][2].shape[:2]
        out = torch.empty(b, c, h, w)
        for y0, x0, t in self.parts:
            out[:, :, y0 : y0 + t.shape[2], x0 : x0 + t.shape[3]] = t
        return out


def clamped(sink: TileSink) -> TileSink:
    """`sink`, given every tile clamped to [-1, 1] in float32 on the host (an image's tiles)."""

    def clamp(y0: int, x0: int, tile: torch.Tensor) -> None:
        sink(y0, x0, tile.float().clamp(-1, 1).cpu())

    return clamp
