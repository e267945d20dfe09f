"""Fusion weights are positive windows whose normalized sum is one everywhere."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gigadiff.fusion import WEIGHT_KINDS, FusionAccumulator, fuse, weight_window
from gigadiff.geometry import Tile, tile_grid


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_windows_are_positive_symmetric_and_peak_in_the_centre(kind):
    w = weight_window(kind, 16, 24)
    assert w.shape == (16, 24) and (w > 0).all()
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(1))
    assert w[8, 12] == w.max()


def test_gaussian_and_cosine_trust_the_centre_more_than_the_border():
    for kind in ("gaussian", "cosine"):
        w = weight_window(kind, 64, 64)
        assert w[0, 0] < 0.01 * w[32, 32]
    assert (weight_window("uniform", 5, 7) == 1).all()


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 90),
    width=st.integers(1, 90),
    tile=st.integers(2, 40),
    overlap_frac=st.floats(0, 0.9),
    kind=st.sampled_from(WEIGHT_KINDS),
    shift=st.floats(-1, 1),
)
def test_partition_of_unity(height, width, tile, overlap_frac, kind, shift):
    grid = tile_grid(height, width, tile, int(overlap_frac * tile), (shift, -shift))
    n = len(grid)
    ones = torch.ones(n, 2, grid.tiles[0].h, grid.tiles[0].w)
    fused = fuse(grid.tiles, ones, (1, 2, height, width), kind)
    assert torch.allclose(fused, torch.ones_like(fused), atol=1e-6)
    # a canvas cut into tiles and fused back is the canvas itself
    canvas = torch.randn(1, 2, height, width)
    tiles = torch.cat([canvas[(..., *t.slices)] for t in grid])
    assert torch.allclose(fuse(grid.tiles, tiles, canvas.shape, kind), canvas, atol=1e-5)


def test_fusion_is_the_weighted_average():
    tiles = (Tile(0, 0, 1, 2), Tile(0, 1, 1, 2))
    preds = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])
    fused = fuse(tiles, preds, (1, 1, 1, 3), "uniform")
    assert fused.flatten().tolist() == [1.0, 4.0, 7.0]


def test_uncovered_pixels_are_an_error():
    acc = FusionAccumulator((1, 1, 4, 4), "uniform")
    acc.add(Tile(0, 0, 2, 2), torch.ones(1, 1, 2, 2))
    with pytest.raises(RuntimeError, match="not covered"):
        acc.result()


@pytest.mark.parametrize("margin", [0, 3])
def test_linear_windows_cross_fade_linearly_across_any_overlap(margin):
    """Two tiles overlapping by 20 px: tile A's share falls in equal steps from its neighbour's rim to its own."""
    for width, overlap in ((60, 20), (52, 12)):
        tile = (width + overlap) // 2
        a, b = Tile(0, 0, 8, tile), Tile(0, width - tile, 8, tile)
        preds = torch.cat([torch.ones(1, 1, 8, tile), torch.zeros(1, 1, 8, tile)])
        share = fuse([a, b], preds, (1, 1, 8, width), "linear", margin=margin)[0, 0, 4]
        lo, hi = b.x + margin, a.x + tile - margin  # the overlap without either rim
        assert torch.all(share[:lo] > 0.999) and torch.all(share[hi:] < 0.001)
        n = hi - lo  # pixel centres of the ramp: shares 1 - (k + 0.5) / n
        expected = 1 - (torch.arange(n) + 0.5) / n
        assert torch.allclose(share[lo:hi], expected, atol=2e-5)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown weight window"):
        FusionAccumulator((1, 1, 2, 2), "triangle")


def test_rim_margin_damps_tile_edges_but_keeps_partition_of_unity():
    w = weight_window("uniform", 32, 32, margin=4)
    assert w[0, 16] < 1e-5 and w[3, 16] < 1e-5 and w[4, 16] == 1 and w[16, 16] == 1
    grid = tile_grid(80, 80, 32, 12)
    ones = torch.ones(len(grid), 1, 32, 32)
    fused = fuse(grid.tiles, ones, (1, 1, 80, 80), "uniform", margin=4)
    assert torch.allclose(fused, torch.ones_like(fused), atol=1e-5)
    # where a neighbour's interior covers a tile's rim, the rim's value is ignored: the garbage moves the fused
    # result by its damped weight (1e-6 x 1000) at most, except on the canvas's own top rows, covered by rims only
    clean = torch.stack([torch.full((1, 32, 32), float(i)) for i in range(len(grid))])
    garbage = clean.clone()
    garbage[:, :, :4, :] = 1000.0  # garbage in every tile's top rim
    fused = fuse(grid.tiles, garbage, (1, 1, 80, 80), "uniform", margin=4)
    reference = fuse(grid.tiles, clean, (1, 1, 80, 80), "uniform", margin=4)
    assert (fused - reference)[..., 4:, :].abs().max() <= 2e-3
    assert torch.allclose(fused[..., :4, :], torch.full_like(fused[..., :4, :], 1000.0), atol=1e-3)


@pytest.mark.parametrize("wrap", [(True, True), (False, True), (True, False)])
def test_partition_of_unity_on_a_wrapped_canvas(wrap):
    grid = tile_grid(40, 56, 24, 8, (0.3, -0.7), wrap=wrap)
    assert any(t.y + t.h > 40 or t.x + t.w > 56 for t in grid), "some window crosses an edge"
    constant = torch.full((len(grid), 2, 24, 24), 3.0)
    fused = fuse(grid.tiles, constant, (1, 2, 40, 56), "gaussian")
    assert torch.allclose(fused, torch.full_like(fused, 3.0))
