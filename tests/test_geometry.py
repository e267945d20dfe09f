"""Tile grids cover the canvas exactly, stay inside it, and shift without changing their cost."""

from __future__ import annotations

import itertools
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gigadiff.geometry import GridPlan, Tile, axis_count, axis_starts, tile_grid

sizes = st.integers(min_value=1, max_value=400)


@st.composite
def grids(draw):
    height, width = draw(sizes), draw(sizes)
    tile = draw(st.integers(min_value=2, max_value=160))
    overlap = draw(st.integers(min_value=0, max_value=tile - 1))
    shift = (draw(st.floats(-1, 1)), draw(st.floats(-1, 1)))
    return height, width, tile, overlap, shift


def coverage(grid) -> np.ndarray:
    counts = np.zeros((grid.height, grid.width), dtype=int)
    for t in grid:
        counts[t.y : t.y + t.h, t.x : t.x + t.w] += 1
    return counts


@settings(max_examples=300, deadline=None)
@given(grids())
def test_every_pixel_covered_and_every_window_inside(params):
    height, width, tile, overlap, shift = params
    grid = tile_grid(height, width, tile, overlap, shift)
    assert (coverage(grid) >= 1).all()
    for t in grid:
        assert t.y >= 0 and t.y + t.h <= height
        assert t.x >= 0 and t.x + t.w <= width
        assert (t.h, t.w) == (min(tile, height), min(tile, width))


@settings(max_examples=300, deadline=None)
@given(grids())
def test_last_window_is_clamped_to_the_edge(params):
    height, width, tile, overlap, shift = params
    grid = tile_grid(height, width, tile, overlap, shift)
    assert max(t.y + t.h for t in grid) == height
    assert max(t.x + t.w for t in grid) == width
    assert min(t.y for t in grid) == 0 and min(t.x for t in grid) == 0


@settings(max_examples=300, deadline=None)
@given(grids())
def test_neighbours_overlap_by_at_least_the_requested_overlap_without_shift(params):
    height, width, tile, overlap, _ = params
    for length in (height, width):
        window = min(tile, length)
        starts = axis_starts(length, window, min(overlap, window - 1))
        for a, b in pairwise(starts):
            assert a + window - b >= min(overlap, window - 1)


@settings(max_examples=300, deadline=None)
@given(grids())
def test_shift_never_changes_the_number_of_windows(params):
    """Shifting costs no extra model calls."""
    height, width, tile, overlap, shift = params
    plain = tile_grid(height, width, tile, overlap)
    shifted = tile_grid(height, width, tile, overlap, shift)
    assert len(shifted) == len(plain)


@settings(max_examples=300, deadline=None)
@given(grids())
def test_shifted_neighbours_keep_half_the_overlap(params):
    height, width, tile, overlap, shift = params
    for length, s in ((height, shift[0]), (width, shift[1])):
        window = min(tile, length)
        ov = min(overlap, window - 1)
        starts = axis_starts(length, window, ov, s)
        for a, b in pairwise(starts):
            assert a + window - b >= ov // 2


@pytest.mark.parametrize("shift", [-1.0, -0.5, 0.5, 1.0])
def test_shifted_neighbours_keep_half_the_overlap_beyond_untrusted_rims(shift):
    """The terrain model's 8-px rims: 2 x 8 px of every overlap cannot cross-fade. Every shifted pair (an edge
    window is clamped while its neighbour moves) keeps a quarter of the overlap to cross-fade beyond the rims,
    and the windows still move: at 2048 px the natural overlap is exactly the requested 32 px."""
    for length in (512, 1024, 2048):
        starts = axis_starts(length, 128, 32, shift, rim_overlap=16)
        assert len(starts) == axis_count(length, 128, 32)
        for a, b in pairwise(starts):
            assert a + 128 - b >= 16 + 32 // 4
        assert starts != axis_starts(length, 128, 32, 0.0, rim_overlap=16)


@pytest.mark.parametrize("length", [256, 300, 512, 1000])
@pytest.mark.parametrize("shift", [-1.0, -0.3, 0.5, 1.0])
def test_shift_keeps_the_window_count_at_ordinary_overlaps(length, shift):
    assert len(axis_starts(length, 64, 8, shift)) == axis_count(length, 64, 8)
    assert len(axis_starts(length, 128, 16, shift)) == axis_count(length, 128, 16)


def test_canvas_smaller_than_tile_gets_one_window_of_canvas_size():
    grid = tile_grid(40, 30, 64, 8)
    assert grid.tiles == (Tile(0, 0, 40, 30),)


def test_known_grid():
    # 64 x 256 canvas, 64 tiles, overlap 8: 5 windows spread evenly (stride 48, real overlap 16)
    grid = tile_grid(64, 256, 64, 8)
    assert [t.x for t in grid] == [0, 48, 96, 144, 192]
    assert axis_count(256, 64, 8) == 5
    assert grid.evaluated_pixels == 5 * 64 * 64


def test_shift_moves_windows_far_from_the_edges_the_most():
    base = axis_starts(256, 64, 8)
    # allowance per pair = 64 - 48 - 4 - 1 = 11 latent pixels; window k moves min(k, 4 - k) allowances
    assert axis_starts(256, 64, 8, 1.0) == (0, 59, 118, 155, 192)
    assert axis_starts(256, 64, 8, -1.0) == (0, 37, 74, 133, 192)
    assert base == (0, 48, 96, 144, 192)
    # a long axis: the middle windows move by up to half a stride
    wide = axis_starts(2048, 128, 32, 1.0)
    narrow = axis_starts(2048, 128, 32)
    assert max(a - b for a, b in zip(wide, narrow, strict=True)) == 48


def test_plan_is_deterministic_and_moves_every_step():
    plan = GridPlan(128, 512, 64, 8, shifted=True, seed=42)
    again = GridPlan(128, 512, 64, 8, shifted=True, seed=42)
    grids_ = [plan.grid(i) for i in range(10)]
    assert grids_ == [again.grid(i) for i in range(10)]
    assert len(set(grids_)) >= 7, "tile borders must move from step to step"
    assert len({plan.shift_for_step(i) for i in range(10)}) == 10
    assert GridPlan(128, 512, 64, 8, shifted=True, seed=43).grid(0) != plan.grid(0)
    unshifted = GridPlan(128, 512, 64, 8, shifted=False)
    assert len({unshifted.grid(i) for i in range(5)}) == 1


@pytest.mark.parametrize("seed", range(20))
def test_consecutive_steps_shift_far_apart(seed):
    """Any 4 consecutive steps' shifts differ pairwise by >= 0.15 (of the [-1, 1] range, taken round a circle:
    shifts -1 and 1 put the middle windows a stride apart, i.e. on their neighbours' places) on some axis, so
    no two of them lay their seams at nearly the same place (independent uniform draws fail this for 5 of
    these 20 seeds)."""
    plan = GridPlan(1024, 1024, 128, 32, shifted=True, seed=seed)
    shifts = [plan.shift_for_step(i) for i in range(6)]

    def apart(a: float, b: float) -> float:
        return min(abs(a - b), 2 - abs(a - b))

    for i in range(3):
        window = shifts[i : i + 4]
        for a, b in itertools.combinations(window, 2):
            assert max(apart(a[0], b[0]), apart(a[1], b[1])) >= 0.15


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        tile_grid(0, 10, 8, 0)
    with pytest.raises(ValueError, match="overlap"):
        axis_starts(100, 10, 10)
    with pytest.raises(ValueError, match="shift"):
        axis_starts(100, 10, 2, 1.5)


@st.composite
def ring_grids(draw):
    height, width, tile, overlap, shift = draw(grids())
    wrap = (draw(st.booleans()), draw(st.booleans()))
    return height, width, tile, overlap, shift, wrap


def ring_coverage(grid) -> np.ndarray:
    from gigadiff.geometry import wrapped_pieces

    counts = np.zeros((grid.height, grid.width), dtype=int)
    for t in grid:
        for _, (cy, cx) in wrapped_pieces(t, grid.height, grid.width):
            counts[cy, cx] += 1
    return counts


@settings(max_examples=300, deadline=None)
@given(ring_grids())
def test_wrapped_axes_are_covered_by_windows_that_may_cross_the_edge(params):
    height, width, tile, overlap, shift, wrap = params
    grid = tile_grid(height, width, tile, overlap, shift, wrap=wrap)
    assume(len(grid) <= 4000)  # tiles of 2 px on 400 px sides: a slow count that tells nothing new
    assert (ring_coverage(grid) >= 1).all()
    assert len(grid) == len(tile_grid(height, width, tile, overlap, (0.0, 0.0), wrap=wrap)), "shift is free"
    for t in grid:
        assert 0 <= t.y < height and 0 <= t.x < width
        if not wrap[0]:
            assert t.y + t.h <= height
        if not wrap[1]:
            assert t.x + t.w <= width


@settings(max_examples=200, deadline=None)
@given(length=st.integers(2, 300), window=st.integers(2, 120), overlap_frac=st.floats(0, 0.9), shift=st.floats(-1, 1))
def test_ring_windows_overlap_across_the_seam_like_everywhere_else(length, window, overlap_frac, shift):
    """Neighbours overlap all around the ring, the last window and the first (across the seam) included."""
    from gigadiff.geometry import ring_starts

    win = min(window, length)
    overlap = min(int(overlap_frac * window), win - 1)
    starts = ring_starts(length, win, overlap, shift)
    assert len(starts) >= 2 and len(set(starts)) == len(starts)
    ring = [*starts, starts[0] + length]
    for a, b in pairwise(ring):
        assert a + win - b >= overlap - 1  # rounding of evenly spaced starts costs at most one pixel


def test_wrapped_pieces_reassemble_a_rolled_window():
    import torch

    from gigadiff.fusion import gather_tile

    canvas = torch.arange(5 * 7, dtype=torch.float32).reshape(1, 1, 5, 7)
    tile = Tile(3, 5, 4, 4)  # runs past the bottom and the right edge
    rolled = canvas.roll((-3, -5), dims=(2, 3))[..., :4, :4]
    assert torch.equal(gather_tile(canvas, tile), rolled)


@given(
    unit=st.sampled_from([2, 4]),
    tokens=st.tuples(st.integers(1, 60), st.integers(1, 60)),
    tile=st.integers(2, 24),
    overlap_frac=st.floats(0, 0.8),
    shift=st.tuples(st.floats(-1, 1), st.floats(-1, 1)),
    wrap=st.tuples(st.booleans(), st.booleans()),
)
def test_packed_models_get_windows_on_whole_tokens_that_still_cover_the_canvas(unit, tokens, tile, overlap_frac, shift,
                                                                               wrap):  # fmt: skip
    """FLUX packs 2x2 latent pixels into a token: every window starts, ends and moves on whole tokens."""
    height, width = tokens[0] * unit, tokens[1] * unit
    overlap = int(overlap_frac * (tile - 1)) * unit
    grid = tile_grid(height, width, tile * unit, overlap, shift, rim_overlap=0, wrap=wrap, unit=unit)
    covered = np.zeros((height, width), dtype=bool)
    for t in grid:
        assert t.y % unit == 0 and t.x % unit == 0 and t.h % unit == 0 and t.w % unit == 0
        rows = np.arange(t.y, t.y + t.h) % height
        cols = np.arange(t.x, t.x + t.w) % width
        covered[np.ix_(rows, cols)] = True
        if not wrap[0]:
            assert t.y + t.h <= height
        if not wrap[1]:
            assert t.x + t.w <= width
    assert covered.all()
