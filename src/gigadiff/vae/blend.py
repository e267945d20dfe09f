"""Smooth blending of fast-mode tile overlaps, streamed in row-major order with only thin strips held back.

Fast mode decodes every tile alone (with frozen statistics) from a crop that reaches `halo` latent px beyond
its core. The output near a crop's edge is the least accurate, and two neighbours' outputs differ a little
there, so cutting them apart at the core boundary leaves a faint step. Instead each tile keeps `m` output px
of its halo on every side that has a neighbour, and across each cut the two tiles cross-fade over a zone of
2m px with complementary linear ramps: the weights sum to exactly one, and the step becomes a ramp.

Streaming stays possible because a tile's pixels are final as soon as its left and upper neighbours are in,
except its own right and bottom zones: `OverlapBlender` carries the previous tile's right zone and the
previous tile row's bottom zones (2m rows x full width) and emits every tile's finished part to the sink at
once. The emitted rectangles still form row-major tile rows of equal height, as `StripAssembler` needs.
Image edges (wrapped ones included) are cut, not blended: a wrapped edge would need the row's last tile
before its first could be written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gigadiff.vae.tiles import TileSink


def ramp(lead: int, length: int, trail: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """1-D tile weight of `length` px: rising over the first 2*lead px, falling over the last 2*trail, else 1.

    A rising ramp and the neighbour's falling ramp over the same zone sum to one at every pixel.
    """
    w = torch.ones(length)
    if lead:
        w[: 2 * lead] = (torch.arange(2 * lead) + 0.5) / (2 * lead)
    if trail:
        w[length - 2 * trail :] = 1 - (torch.arange(2 * trail) + 0.5) / (2 * trail)
    return w.to(device)


def even_cuts(size: int, core: int, unit: int) -> list[int]:
    """Boundaries 0 = c0 < c1 < ... = size of ceil(size / core) tiles of near-equal length, multiples of `unit`.

    Equal tiles keep the smallest one (which bounds the blend zone) at least about core / 2, where plain
    `core` steps could leave a sliver at the end.
    """
    n = max(1, math.ceil(size / core))
    inner = [round(i * size / n / unit) * unit for i in range(1, n)]
    return [0, *sorted({c for c in inner if 0 < c < size}), size]


@dataclass(frozen=True)
class TileSpan:
    """One tile's core [y0, y1) x [x0, x1) in output px and the blend margins it keeps on each side."""

    y0: int
    y1: int
    x0: int
    x1: int
    top: int
    bottom: int
    left: int
    right: int

    @property
    def rows(self) -> tuple[int, int]:
        """The output rows the tile contributes to (core plus margins)."""
        return self.y0 - self.top, self.y1 + self.bottom

    @property
    def cols(self) -> tuple[int, int]:
        return self.x0 - self.left, self.x1 + self.right


def tile_span(y0: int, y1: int, x0: int, x1: int, height: int, width: int, margin: int) -> TileSpan:
    """The span of a core tile: `margin` px kept on every side that has a neighbour (not at the image edges)."""
    top, bottom = (margin if y0 > 0 else 0), (margin if y1 < height else 0)
    left, right = (margin if x0 > 0 else 0), (margin if x1 < width else 0)
    return TileSpan(y0, y1, x0, x1, top, bottom, left, right)


class OverlapBlender:
    """A sink for row-major tiles with blend margins: cross-fades the overlaps and emits finished pixels."""

    def __init__(self, sink: TileSink, width: int) -> None:
        self.sink, self.width = sink, width
        self.above: torch.Tensor | None = None  # the previous tile row's bottom zones, full width
        self.below: torch.Tensor | None = None  # this tile row's bottom zones, filled tile by tile
        self.carried: torch.Tensor | None = None  # the previous tile's right zone (its whole row span)
        self.row: int | None = None

    def add(self, span: TileSpan, tile: torch.Tensor) -> None:
        """`tile` [B, C, rows, cols] is the tile's raw output over span.rows x span.cols, in row-major order."""
        if span.y0 != self.row:  # a new tile row: the finished row's bottom zones become this row's top zones
            self.above, self.below, self.carried, self.row = self.below, None, None, span.y0
        r0, r1 = span.rows
        c0, c1 = span.cols
        t = tile.float()
        t = t * ramp(span.top, r1 - r0, span.bottom, t.device)[:, None] * ramp(span.left, c1 - c0, span.right, t.device)
        lead, trail = 2 * span.left, 2 * span.right
        if lead:
            assert self.carried is not None, "a tile with a left margin needs its left neighbour first"
            t[..., :lead] += self.carried
        if span.top:
            assert self.above is not None, "a tile with a top margin needs the tile row above it first"
            t[..., : 2 * span.top, lead:] += self.above[..., c0 + lead : c1]
        keep_rows = t.shape[2] - 2 * span.bottom
        keep_cols = t.shape[3] - trail
        if span.bottom:
            if self.below is None:
                self.below = t.new_zeros(*t.shape[:2], 2 * span.bottom, self.width)
            self.below[..., c0 : c0 + keep_cols] = t[..., keep_rows:, :keep_cols]
        self.carried = t[..., -trail:].clone() if trail else None
        self.sink(r0, c0, t[..., :keep_rows, :keep_cols])
