"""Tile geometry over a latent canvas: which windows the model sees at each denoising step.

Pure functions and frozen dataclasses; all sizes are in *latent* pixels. A grid covers the canvas exactly:
every canvas pixel lies in at least one window, and no window leaves the canvas (the last window on each
axis is clamped to the edge instead of hanging over it).

Shifted grids move their interior windows by a seeded random offset at every step, so that tile borders are
never in the same place twice and no seam can build up over the steps. The number of windows never changes
with the shift, so shifting costs no extra model calls. How far borders move on an axis is bounded by what
keeps neighbours overlapping by at least half the requested overlap: amplitude = real overlap - overlap / 2,
i.e. at least half the requested overlap, more when the windows had to be spread out to fit the canvas.

On a wrapped axis (seamless textures, 360-degree panoramas) the canvas is a ring: windows are spaced evenly
around it, may cross the edge (a window starting at x continues at column 0 past the right edge), and at
least two windows are used, so that some window always straddles the seam between the last and first column.
A tile that crosses the edge is cut and pasted in pieces (`wrapped_pieces`).

Models that pack several latent pixels into one token (FLUX: 2x2) need every window to start, end and move on
whole tokens: with `unit` > 1 a grid is laid out on the canvas measured in tokens and scaled back, so sizes,
overlaps and shifts are always multiples of the unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, order=True)
class Tile:
    """One window on the canvas: top-left corner (y, x) and size (h, w), in latent pixels."""

    y: int
    x: int
    h: int
    w: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)

    @property
    def area(self) -> int:
        return self.h * self.w


@dataclass(frozen=True)
class TileGrid:
    """The windows used at one step, in canonical (row-major) order."""

    height: int
    width: int
    tiles: tuple[Tile, ...]
    wrap: tuple[bool, bool] = (False, False)
    """(vertical, horizontal): tiles on a wrapped axis may cross the canvas edge and continue on the other side."""

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self):
        return iter(self.tiles)

    @property
    def evaluated_pixels(self) -> int:
        """Latent pixels the model evaluates for this grid (overlap counted as often as it is computed)."""
        return sum(t.area for t in self.tiles)


def axis_count(length: int, window: int, overlap: int) -> int:
    """How many windows of `window` pixels, overlapping by at least `overlap`, cover `length` pixels."""
    if window >= length:
        return 1
    return math.ceil((length - overlap) / (window - overlap))


def axis_starts(length: int, window: int, overlap: int, shift: float = 0.0, rim_overlap: int = 0) -> tuple[int, ...]:
    """Start positions of the windows along one axis.

    Windows are spread evenly between the two edges (so real overlaps are >= `overlap`). `shift` in [-1, 1]
    moves the interior windows (the first and last stay clamped to the edges): window k of n by
    shift * min(k, n - 1 - k) * allowance, at most half a stride. Every pair of neighbours moves apart or
    together by at most the allowance, so it keeps overlapping by at least `shift_overlap`, and the number of
    windows is the same for every shift. Windows far from the edges move the most (a uniform shift would be
    limited everywhere by the two clamped edge windows), and by at most half a stride, so that shifts -1 and
    1 put them a stride apart: one window's range of positions never overlaps its neighbour's.
    """
    if not -1.0 <= shift <= 1.0:
        raise ValueError(f"shift must lie in [-1, 1], got {shift}")
    if window >= length:
        return (0,)
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must satisfy 0 <= overlap < window, got overlap={overlap}, window={window}")
    n = axis_count(length, window, overlap)
    last = length - window
    if n == 1:
        return (0,)
    stride = last / (n - 1)
    allowance = max(0.0, window - stride - shift_overlap(overlap, rim_overlap) - 1)  # 1: rounding of starts
    starts = [0]
    for k in range(1, n - 1):
        offset = shift * min(k * allowance, (n - 1 - k) * allowance, stride / 2, stride - 1)
        starts.append(min(max(round(k * stride + offset), 0), last))
    starts.append(last)
    return tuple(sorted(set(starts)))


def shift_overlap(overlap: int, rim_overlap: int) -> int:
    """The least overlap shifted neighbours keep: half the requested overlap, and beyond the `rim_overlap` px
    that two untrusted tile rims take (which cannot cross-fade) a quarter of it, so that no shifted pair meets
    in a hard seam."""
    return max(overlap // 2, rim_overlap + overlap // 4) if rim_overlap else overlap // 2


def ring_starts(length: int, window: int, overlap: int, shift: float = 0.0) -> tuple[int, ...]:
    """Start positions of windows spaced evenly around a ring of `length` pixels (a wrapped axis).

    At least two windows, and the pair (last, first) overlaps across the seam like every other pair of
    neighbours, by at least `overlap` (less one pixel of rounding). `shift` in [-1, 1] rotates the whole set by
    up to one spacing: on a ring every position is interior, so the seam gets no special treatment.
    """
    if not -1.0 <= shift <= 1.0:
        raise ValueError(f"shift must lie in [-1, 1], got {shift}")
    window = min(window, length)
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must satisfy 0 <= overlap < window, got overlap={overlap}, window={window}")
    n = max(2, math.ceil(length / (window - overlap)))
    stride = length / n
    offset = math.floor((shift + 1.0) / 2.0 * stride)  # a whole-pixel rotation of the unshifted pattern, so
    # float rounding can never widen one gap (floor(k * stride + offset) could: shift -2e-16 left a row uncovered)
    return tuple(sorted((math.floor(k * stride) + offset) % length for k in range(n)))  # distinct: stride >= 1


def wrapped_pieces(tile: Tile, height: int, width: int) -> list[tuple[tuple[slice, slice], tuple[slice, slice]]]:
    """The parts of `tile` on a canvas where it may run past the bottom/right edge and continue at the top/left.

    Returns (slices inside the tile, slices on the canvas) pairs: one pair for a tile inside the canvas, two or
    four for a tile that crosses an edge.
    """

    def axis(start: int, size: int, length: int) -> list[tuple[slice, slice]]:
        first = min(size, length - start)
        parts = [(slice(0, first), slice(start, start + first))]
        if first < size:
            parts.append((slice(first, size), slice(0, size - first)))
        return parts

    return [((ty, tx), (cy, cx)) for ty, cy in axis(tile.y, tile.h, height) for tx, cx in axis(tile.x, tile.w, width)]


def tile_grid(
    height: int,
    width: int,
    tile: int | tuple[int, int],
    overlap: int,
    shift: tuple[float, float] = (0.0, 0.0),
    rim_overlap: int = 0,
    wrap: tuple[bool, bool] = (False, False),
    unit: int = 1,
) -> TileGrid:
    """A row-major grid of windows covering a `height` x `width` canvas, on whole multiples of `unit` px.

    A canvas smaller than the tile on an axis gets one window of the canvas size on that axis (on a wrapped
    axis: two such windows, half a canvas apart).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"canvas must be non-empty, got {height}x{width}")
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    if tile_h <= 0 or tile_w <= 0:
        raise ValueError(f"tile must be positive, got {tile_h}x{tile_w}")
    if unit > 1:
        if height % unit or width % unit or tile_h % unit or tile_w % unit:
            raise ValueError(f"canvas {height}x{width} and tile {tile_h}x{tile_w} must be multiples of {unit}")
        coarse = tile_grid(height // unit, width // unit, (tile_h // unit, tile_w // unit), overlap // unit, shift,
                           -(-rim_overlap // unit), wrap)  # fmt: skip
        tiles = tuple(Tile(t.y * unit, t.x * unit, t.h * unit, t.w * unit) for t in coarse)
        return TileGrid(height, width, tiles, wrap)
    win_h, win_w = min(tile_h, height), min(tile_w, width)

    def starts(length: int, win: int, axis_shift: float, wraps: bool) -> tuple[int, ...]:
        if wraps:
            return ring_starts(length, win, min(overlap, win - 1), axis_shift)
        return axis_starts(length, win, min(overlap, win - 1), axis_shift, rim_overlap)

    ys = starts(height, win_h, shift[0], wrap[0])
    xs = starts(width, win_w, shift[1], wrap[1])
    return TileGrid(height, width, tuple(Tile(y, x, win_h, win_w) for y in ys for x in xs), wrap)


PLASTIC = 1.324717957244746
R2_STEP = np.array([1 / PLASTIC, 1 / PLASTIC**2])


@dataclass(frozen=True)
class GridPlan:
    """The grid to use at each step of one generation.

    With `shifted`, step i's grid is moved by an offset that depends only on (seed, i) (see shift_for_step),
    so the same settings give the same grids on every process, whatever the batch size or world size.
    """

    height: int
    width: int
    tile: int
    overlap: int
    shifted: bool = True
    seed: int = 0
    rim_overlap: int = 0
    """Overlap taken by untrusted tile rims (2 x the model's edge margin), which cannot cross-fade."""
    wrap: tuple[bool, bool] = (False, False)
    """(vertical, horizontal) axes on which the canvas is a ring (tileable output)."""
    unit: int = 1
    """Canvas pixels per token side: windows start, end and move on multiples of it."""

    def shift_for_step(self, step: int) -> tuple[float, float]:
        """Step i's shift in [-1, 1]^2: a seeded start plus i steps of the R2 low-discrepancy sequence.

        Independent random shifts often repeat a grid within a few steps (its seams then add up); R2 steps
        (Roberts, 2018: the plastic number's inverse powers) spread any run of consecutive steps evenly.
        """
        if not self.shifted:
            return (0.0, 0.0)
        start = np.random.default_rng([self.seed % (2**63)]).uniform(0.0, 1.0, size=2)
        phase = (start + step * R2_STEP) % 1.0
        return float(2 * phase[0] - 1), float(2 * phase[1] - 1)

    def grid(self, step: int) -> TileGrid:
        shift = self.shift_for_step(step)
        return tile_grid(self.height, self.width, self.tile, self.overlap, shift, self.rim_overlap, self.wrap,
                         self.unit)  # fmt: skip

    @property
    def tiles_per_step(self) -> int:
        return len(self.grid(0))
