"""Weight windows: how much each tile's prediction counts at each of its pixels (pure, torch-free).

Fusion (gigadiff.fusion) multiplies every tile's prediction by its window and divides by the summed windows,
so whatever the window, the effective weights sum to one at every canvas pixel. Windows are strictly
positive, so every covered pixel has a non-zero denominator, including pixels at the canvas edge that only
one tile reaches.

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
"""

from __future__ import annotations

import math

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


def axis_profile(kind: str, n: int, margin: int = 0) -> list[float]:
    """The window's weights along one axis of n pixels, rims of `margin` px damped by RIM_FACTOR."""
    profile = _profile(kind, n)
    m = min(margin, (n - 1) // 2)
    if kind == "linear":  # the tent starts where the rim ends, so the cross-fade begins at zero there
        profile = [max(v - m, 0.5) for v in profile]
    return [v * RIM_FACTOR if i < m or i >= n - m else v for i, v in enumerate(profile)]
