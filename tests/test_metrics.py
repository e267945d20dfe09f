"""The seam score flags a planted seam and passes a clean image."""

from __future__ import annotations

import numpy as np
import pytest

from gigadiff.geometry import tile_grid
from gigadiff.metrics import grid_borders, seam_score


def test_clean_noise_scores_about_one_and_a_planted_step_is_flagged():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(256, 256))
    assert seam_score(image, [128], [64, 192]).ratio == pytest.approx(1.0, abs=0.15)
    seamed = image.copy()
    seamed[:, 64:] += 2.0  # a step along column 64
    assert seam_score(seamed, [], [64]).ratio == pytest.approx(3.0, rel=0.1)  # (2 + 2**2) / 2
    smooth = np.add.outer(np.arange(256.0), np.arange(256.0))  # a ramp: gradients equal everywhere
    assert seam_score(smooth, [100], [100]).ratio == pytest.approx(1.0)


def test_grid_borders_are_the_inner_tile_edges():
    grid = tile_grid(64, 256, 64, 8)
    rows, cols = grid_borders([grid], scale=8)
    assert rows == []
    assert cols == [v * 8 for v in sorted({48, 96, 144, 192, 64, 112, 160, 208})]


def test_needs_borders():
    with pytest.raises(ValueError, match="at least one border"):
        seam_score(np.zeros((8, 8)), [], [])
