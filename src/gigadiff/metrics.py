"""Image quality measures that need no downloaded weights: seams, edge continuity, duplicated content.

Seam score: the mean squared gradient *across* given tile borders, divided by the same quantity everywhere
else. A seam (a step or a crease along a border) raises it above 1; an image whose borders cannot be told
from its interior scores about 1. Gradients across a vertical border at column c are I[:, c] - I[:, c-1]
(horizontal differences), across a horizontal border at row r are I[r, :] - I[r-1, :].

Grid anisotropy: seams and tile-sized plateaus are straight and lie along the image axes; natural content has
no preferred direction. The score is the spectral power (Hann-windowed image, wavelengths 8-128 px) in thin
wedges round the two axes against the oblique directions, averaged per octave: about 1 for an isotropic image,
well above for a grid of straight edges. `null_sd` is the spread of the log of the same ratio for wedges at
oblique angles (chance).

Band texture: texture energy (gradient, and a 2-px high-pass) in the pixels two or more tiles cover against
the pixels one tile covers: about 1 when overlap bands read like the interior, below 1 where fusion averaged
unrelated detail smooth, above 1 where cross-fades between unrelated relief add slopes. Line contrast: the
strongest single row or column boundary against the boundaries 1-4 px beside it (a straight line in a relief).

Edge continuity: for output meant to tile (textures, 360-degree panoramas), the mean squared step from the
last column to the first (or last row to first), divided by the mean squared step between neighbouring
columns (rows) inside the image. About 1 when copies placed side by side show no seam (one line against the
mean of all lines: 0.5 to 2 on smooth periodic fields); 10 and more for an image cut out of a larger one.

Duplication: tiled text-to-image at many times a model's native size tends to paint the prompt's subject once
per tile. The image is cut into non-overlapping crops; every pair is compared by the peak of their normalised
cross-correlation over all shifts, on grey, downsampled and high-passed crops (the local mean removed, so that
two smooth skies do not look alike). It is close to 1 when one crop repeats another anywhere inside it; on
skimage's photos it stays below 0.45, and a subject planted twice scores about 0.7 (tests/test_metrics.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from gigadiff.geometry import TileGrid


@dataclass(frozen=True)
class SeamScore:
    """Gradient energy across tile borders against the rest of the image.

    `ratio` is the border/interior energy ratio. Natural images are not uniform (a mountain range crossing
    a few border lines moves it a lot), so two companions say how much it means:
    - `null_sd`: the spread of the same ratio over random sets of as many lines; a ratio within about two of
      these from 1 cannot be told from chance;
    - `local`: each border line against the lines `LOCAL_NEAR` px to either side of it (not themselves
      borders), which sees the same terrain: about 1 seamless, above 1 a crease or step, below 1 a band
      smoothed by averaging unrelated content.
    """

    ratio: float
    border_energy: float
    interior_energy: float
    local: float = float("nan")
    null_sd: float = float("nan")


LOCAL_NEAR = (6, 12)
"""Distances (px) of the lines a border line is compared with by the local seam ratio."""
NULL_DRAWS = 200


def grid_borders(grids: Iterable[TileGrid], scale: int = 1) -> tuple[list[int], list[int]]:
    """Rows and columns (in pixels, times `scale`) where some tile of some grid starts or ends inside the canvas
    (around a wrapped axis, its ring; tiles may reach beyond an unwrapped edge, into a run's border padding)."""

    def inside(v: int, size: int, wraps: bool) -> int | None:
        if wraps:
            return v % size or None
        return v if 0 < v < size else None

    rows: set[int] = set()
    cols: set[int] = set()
    for grid in grids:
        for t in grid:
            rows.update(v * scale for e in (t.y, t.y + t.h) if (v := inside(e, grid.height, grid.wrap[0])))
            cols.update(v * scale for e in (t.x, t.x + t.w) if (v := inside(e, grid.width, grid.wrap[1])))
    return sorted(rows), sorted(cols)


def _as_float(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    return img[..., None] if img.ndim == 2 else img


def line_energies(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared step across every row line and every column line of a [H, W] or [H, W, C] image.

    Entry k of an axis is the line between pixels k and k+1 along it: [H-1] row lines, [W-1] column lines.
    """
    img = _as_float(image)
    return (np.diff(img, axis=0) ** 2).mean(axis=(1, 2)), (np.diff(img, axis=1) ** 2).mean(axis=(0, 2))


def seam_score(image: np.ndarray, rows: Iterable[int], cols: Iterable[int], band: int = 1) -> SeamScore:
    """Border-to-interior gradient energy ratio of a [H, W] or [H, W, C] image, with its local and null spread.

    Each border counts the `band` difference lines nearest to it (band=1: exactly the line across the border).
    """
    height, width = np.shape(image)[:2]
    lines = list(line_energies(image))
    lengths = (width, height)  # samples per line: a row line spans the width, a column line the height
    masks = [np.zeros(e.size, dtype=bool) for e in lines]
    half = band // 2
    for mask, borders in zip(masks, (rows, cols), strict=True):
        for border in borders:
            mask[max(border - 1 - half, 0) : min(border - 1 - half + band, mask.size)] = True
    if not any(m.any() for m in masks) or all(m.all() for m in masks):
        raise ValueError("seam_score needs at least one border and some interior")
    b, i = _energy(lines, lengths, masks), _energy(lines, lengths, [~m for m in masks])
    ratio = b / i if i > 0 else float("inf")
    return SeamScore(ratio, b, i, _local_ratio(lines, lengths, masks), _null_sd(lines, lengths, masks))


def _energy(lines: list[np.ndarray], lengths: tuple[int, int], masks: list[np.ndarray]) -> float:
    total = sum(n * float(e[m].sum()) for e, n, m in zip(lines, lengths, masks, strict=True))
    count = sum(n * int(m.sum()) for n, m in zip(lengths, masks, strict=True))
    return total / count if count else 0.0


def _local_ratio(lines: list[np.ndarray], lengths: tuple[int, int], masks: list[np.ndarray]) -> float:
    near = np.r_[-LOCAL_NEAR[1] : -LOCAL_NEAR[0] + 1, LOCAL_NEAR[0] : LOCAL_NEAR[1] + 1]
    border = around = 0.0
    for e, n, m in zip(lines, lengths, masks, strict=True):
        for k in np.flatnonzero(m):
            idx = k + near
            idx = idx[(idx >= 0) & (idx < e.size)]
            idx = idx[~m[idx]]
            if idx.size:
                border += n * float(e[k])
                around += n * float(e[idx].mean())
    return border / around if around > 0 else float("nan")


def _null_sd(lines: list[np.ndarray], lengths: tuple[int, int], masks: list[np.ndarray]) -> float:
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(NULL_DRAWS):
        drawn = []
        for e, m in zip(lines, masks, strict=True):
            d = np.zeros(e.size, dtype=bool)
            d[rng.choice(e.size, int(m.sum()), replace=False)] = True
            drawn.append(d)
        interior = _energy(lines, lengths, [~d for d in drawn])
        if interior > 0:
            ratios.append(_energy(lines, lengths, drawn) / interior)
    return float(np.std(ratios)) if ratios else float("nan")


GRID_BAND = (1 / 128, 1 / 8)
"""Spatial frequencies (cycles/px) the grid anisotropy looks at: wavelengths from a 128-px tile to 8 px."""
GRID_WEDGE = 2.0
"""Half-width (degrees) of the wedges round each axis and round each reference angle."""
GRID_REFERENCES = tuple(range(10, 81, 5))
"""Oblique angles (degrees) whose wedges give the chance spread."""


@dataclass(frozen=True)
class BandTexture:
    """Texture energy in tile overlaps against the texture under one tile: about 1 when the bands read like the
    interior, below 1 when fusion smoothed them (the mean of independent detail), above 1 when it creased them."""

    gradient: float
    """Mean squared gradient (both axes) in the bands / the same under one tile."""
    highpass: float
    """Mean squared high-pass (the image less its Gaussian blur of HIGHPASS_SIGMA px), bands / one tile."""


HIGHPASS_SIGMA = 2.0


def coverage(grid: TileGrid) -> np.ndarray:
    """How many of `grid`'s tiles cover each canvas pixel ([height, width] ints; round a wrapped axis's ring)."""
    from gigadiff.geometry import wrapped_pieces

    count = np.zeros((grid.height, grid.width), dtype=np.int64)
    for tile in grid:
        for _, (rows, cols) in wrapped_pieces(tile, grid.height, grid.width):
            count[rows, cols] += 1
    return count


def band_texture(image: np.ndarray, overlapped: np.ndarray, edge: int = 4) -> BandTexture:
    """BandTexture of a [H, W] image whose pixels under two or more tiles are `overlapped` ([H, W] bools),
    pixels within `edge` px of the image's border left out of both."""
    import torch

    from gigadiff.lowpass import gaussian_lowpass

    img = np.asarray(image, dtype=np.float64)
    gy, gx = np.gradient(img)
    gradient = np.asarray(gy**2 + gx**2)
    blurred = gaussian_lowpass(torch.from_numpy(img)[None, None], HIGHPASS_SIGMA)[0, 0].numpy()
    highpass = np.asarray((img - blurred) ** 2)
    inner = np.zeros(img.shape, dtype=bool)
    inner[edge:-edge, edge:-edge] = True
    band, single = overlapped & inner, ~overlapped & inner
    if not band.any() or not single.any():
        raise ValueError("band_texture needs pixels under one tile and pixels under several")
    return BandTexture(float(gradient[band].mean() / gradient[single].mean()),
                       float(highpass[band].mean() / highpass[single].mean()))  # fmt: skip


@dataclass(frozen=True)
class LineContrast:
    """The strongest straight line: the row or column boundary whose mean |step| across it is highest against
    the boundaries `LINE_NEIGHBOURS` px to either side of it (a relief shows a ratio of 1.25 as a line)."""

    ratio: float
    axis: str
    """"column" (a vertical line between columns at - 1 and at) or "row"."""
    at: int


LINE_NEIGHBOURS = (1, 2, 3, 4)


def line_contrast(image: np.ndarray, edge: int = 5) -> LineContrast:
    """LineContrast of a [H, W] image over every row and column boundary at least `edge` px from its border."""
    img = np.asarray(image, dtype=np.float64)
    best = LineContrast(0.0, "column", 0)
    for axis, name in ((1, "column"), (0, "row")):
        steps = np.abs(np.diff(img, axis=axis)).mean(axis=1 - axis)  # entry k: between k and k + 1
        for k in range(edge, steps.size - edge):
            near = [steps[k + d] for d in LINE_NEIGHBOURS] + [steps[k - d] for d in LINE_NEIGHBOURS]
            ratio = float(steps[k] / np.mean(near))
            if ratio > best.ratio:
                best = LineContrast(ratio, name, k + 1)
    return best


@dataclass(frozen=True)
class GridAnisotropy:
    """`ratio`: spectral power in thin wedges round the two image axes / in the oblique directions, per octave
    (geometric mean over frequency bins); `null_sd`: the spread (of the log) of the same ratio for wedges at
    oblique reference angles, i.e. how far from 1 an isotropic image moves it by chance."""

    ratio: float
    null_sd: float


def grid_anisotropy(image: np.ndarray) -> GridAnisotropy:
    """How much more axis-aligned structure an image holds than oblique structure (see the module docstring)."""
    img = _as_float(image).mean(axis=2)
    h, w = img.shape
    window = np.outer(np.hanning(h), np.hanning(w))  # no streaks from the image's own edges
    power = np.abs(np.fft.fft2((img - img.mean()) * window)) ** 2
    ky, kx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    radius = np.hypot(ky, kx)
    angle = np.degrees(np.arctan2(np.abs(ky), np.abs(kx)))  # 0 (horizontal frequencies) .. 90
    lo, hi = GRID_BAND
    band = (radius >= lo) & (radius <= hi)
    oblique = band & (np.minimum(angle, 90 - angle) >= 4 * GRID_WEDGE)
    edges = np.geomspace(lo, hi, 9)
    rings = [(radius >= a) & (radius < b) for a, b in itertools.pairwise(edges)]
    # each ring's oblique power, the denominator of every wedge's ratio (rings without oblique bins are dropped)
    references_by_ring = [(ring, power[oblique & ring].mean()) for ring in rings if (oblique & ring).any()]

    def log_ratio(wedge: np.ndarray) -> float:
        logs = [np.log(power[wedge & ring].mean() / reference)
                for ring, reference in references_by_ring if (wedge & ring).any()]  # fmt: skip
        return float(np.mean(logs)) if logs else float("nan")

    def wedge(at: float) -> np.ndarray:
        return band & (np.abs(angle - at) < GRID_WEDGE)

    axes = log_ratio(wedge(0) | wedge(90))
    references = [log_ratio(wedge(a)) for a in GRID_REFERENCES]
    return GridAnisotropy(float(np.exp(axes)), float(np.std(references)))


@dataclass(frozen=True)
class EdgeContinuity:
    """Wrapped-edge step energy over interior step energy, per axis (x: left/right, y: top/bottom)."""

    x: float
    y: float


def edge_continuity(image: np.ndarray) -> EdgeContinuity:
    """How well the image continues across its own edges (about 1: seamless when tiled; >> 1: a visible seam)."""
    img = _as_float(image)
    if img.shape[0] < 3 or img.shape[1] < 3:
        raise ValueError(f"edge continuity needs an image of at least 3x3 pixels, got {img.shape[1]}x{img.shape[0]}")

    def ratio(a: np.ndarray) -> float:  # steps along axis 0 of `a`, the wrapped one last
        inner = float((np.diff(a, axis=0) ** 2).mean())
        wrapped = float(((a[0] - a[-1]) ** 2).mean())
        return wrapped / inner if inner > 0 else (0.0 if wrapped == 0 else float("inf"))

    return EdgeContinuity(x=ratio(img.transpose(1, 0, 2)), y=ratio(img))


@dataclass(frozen=True)
class Duplication:
    """The most similar pair of non-overlapping crops: their score in [-1, 1] and their (row, col) indices."""

    score: float
    pair: tuple[tuple[int, int], tuple[int, int]]
    mean: float
    """Mean pair score: a baseline for the image's own texture."""


DUPLICATION_THUMB = 64
HIGH_PASS = 9
"""Side of the box whose mean is removed from each thumbnail pixel."""


def box_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k boxes centred on every pixel (edges reflected), by cumulative sums."""
    r = k // 2
    padded = np.pad(a, r, mode="reflect")
    for axis in (0, 1):
        c = np.cumsum(padded, axis=axis)
        c = np.concatenate([np.zeros_like(c.take([0], axis=axis)), c], axis=axis)
        n = padded.shape[axis] - k + 1
        padded = (c.take(range(k, k + n), axis=axis) - c.take(range(n), axis=axis)) / k
    return padded


def _thumb(crop: np.ndarray, side: int) -> np.ndarray:
    """Grey, box-downsampled to about side x side, high-passed, zero mean, unit norm (products are correlations)."""
    grey = crop.mean(axis=2)
    h, w = grey.shape
    fy, fx = max(h // side, 1), max(w // side, 1)
    grey = grey[: h // fy * fy, : w // fx * fx].reshape(h // fy, fy, w // fx, fx).mean(axis=(1, 3))
    if min(grey.shape) > HIGH_PASS:
        grey = grey - box_mean(grey, HIGH_PASS)
    grey = grey - grey.mean()
    norm = np.linalg.norm(grey)
    return grey / norm if norm > 0 else grey


def duplication(image: np.ndarray, grid: int = 4, thumb: int = DUPLICATION_THUMB) -> Duplication:
    """Peak normalised cross-correlation (over all circular shifts) between `grid` x `grid` crops."""
    img = _as_float(image)
    h, w = img.shape[0] // grid, img.shape[1] // grid
    if grid < 2 or h < 8 or w < 8:
        raise ValueError(f"duplication needs at least 2x2 crops of 8 px; got {grid}x{grid} crops of {w}x{h} px")
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    thumbs = {rc: _thumb(img[rc[0] * h : (rc[0] + 1) * h, rc[1] * w : (rc[1] + 1) * w], thumb) for rc in cells}
    shape = thumbs[cells[0]].shape
    spectra = {rc: np.fft.rfft2(t) for rc, t in thumbs.items()}
    best, best_pair, total, pairs = -1.0, (cells[0], cells[1]), 0.0, 0
    for a, b in itertools.combinations(cells, 2):
        score = float(np.fft.irfft2(spectra[a] * np.conj(spectra[b]), s=shape).max())
        total += score
        pairs += 1
        if score > best:
            best, best_pair = score, (a, b)
    return Duplication(score=best, pair=best_pair, mean=total / pairs)
