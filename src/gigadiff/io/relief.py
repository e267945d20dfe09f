"""Shaded relief: a heightmap rendered for people to look at (hillshade over a hypsometric colour ramp)."""

from __future__ import annotations

import numpy as np

# elevation fraction -> RGB, from lowland green through brown to snow
_RAMP = np.array(
    [
        [0.00, 46, 94, 54],
        [0.20, 98, 140, 72],
        [0.45, 176, 164, 104],
        [0.70, 140, 102, 68],
        [0.88, 190, 182, 176],
        [1.00, 250, 250, 250],
    ],
    dtype=np.float64,
)


def hillshade(
    heights: np.ndarray, pixel_size: float, azimuth_deg: float = 315.0, altitude_deg: float = 45.0
) -> np.ndarray:
    """Lambertian shading in [0, 1] of a heightmap lit from `azimuth` (clockwise from north) and `altitude`."""
    dy, dx = np.gradient(heights.astype(np.float64), pixel_size)
    slope = np.arctan(np.hypot(dx, dy))
    aspect = np.arctan2(-dx, dy)
    az, alt = np.radians(360.0 - azimuth_deg + 90.0), np.radians(altitude_deg)
    shade = np.sin(alt) * np.cos(slope) + np.cos(alt) * np.sin(slope) * np.cos(az - aspect)
    return np.clip(shade, 0.0, 1.0)


def shaded_relief(heights: np.ndarray, pixel_size: float = 0.1) -> np.ndarray:
    """[H, W] heights (metres) -> [H, W, 3] uint8 colour image. `pixel_size` is metres per pixel."""
    lo, hi = float(heights.min()), float(heights.max())
    frac = (heights - lo) / (hi - lo) if hi > lo else np.zeros_like(heights, dtype=np.float64)
    colour = np.stack([np.interp(frac, _RAMP[:, 0], _RAMP[:, c]) for c in (1, 2, 3)], axis=-1)
    shade = hillshade(heights, pixel_size)[..., None]
    return np.clip(colour * (0.35 + 0.75 * shade), 0, 255).astype(np.uint8)
