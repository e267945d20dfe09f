"""Image quality measures that need no downloaded weights.

Seam score: the mean squared gradient *across* given tile borders, divided by the same quantity everywhere
else. A seam (a step or a crease along a border) raises it above 1; an image whose borders cannot be told
from its interior scores about 1. Gradients across a vertical border at column c are I[:, c] - I[:, c-1]
(horizontal differences), across a horizontal border at row r are I[r, :] - I[r-1, :].
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from gigadiff.geometry import TileGrid


@dataclass(frozen=True)
class SeamScore:
    ratio: float
    border_energy: float
    interior_energy: float


def grid_borders(grids: Iterable[TileGrid], scale: int = 1) -> tuple[list[int], list[int]]:
    """Rows and columns (in pixels, times `scale`) where some tile of some grid starts or ends inside the canvas."""
    rows: set[int] = set()
    cols: set[int] = set()
    for grid in grids:
        for t in grid:
            rows.update(v * scale for v in (t.y, t.y + t.h) if 0 < v < grid.height)
            cols.update(v * scale for v in (t.x, t.x + t.w) if 0 < v < grid.width)
    return sorted(rows), sorted(cols)


def seam_score(image: np.ndarray, rows: Iterable[int], cols: Iterable[int], band: int = 1) -> SeamScore:
    """Border-to-interior gradient energy ratio of a [H, W] or [H, W, C] image.

    Each border counts the `band` difference lines nearest to it (band=1: exactly the line across the border).
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = img[..., None]
    dx = np.diff(img, axis=1) ** 2  # dx[:, c-1] is across the border between columns c-1 and c
    dy = np.diff(img, axis=0) ** 2
    col_mask = np.zeros(dx.shape[1], dtype=bool)
    row_mask = np.zeros(dy.shape[0], dtype=bool)
    half = band // 2
    for c in cols:
        col_mask[max(c - 1 - half, 0) : min(c - 1 - half + band, dx.shape[1])] = True
    for r in rows:
        row_mask[max(r - 1 - half, 0) : min(r - 1 - half + band, dy.shape[0])] = True
    border = np.concatenate([dx[:, col_mask].ravel(), dy[row_mask].ravel()])
    interior = np.concatenate([dx[:, ~col_mask].ravel(), dy[~row_mask].ravel()])
    if border.size == 0 or interior.size == 0:
        raise ValueError("seam_score needs at least one border and some interior")
    b, i = float(border.mean()), float(interior.mean())
    return SeamScore(ratio=b / i if i > 0 else float("inf"), border_energy=b, interior_energy=i)
