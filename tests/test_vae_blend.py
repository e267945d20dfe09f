"""Cross-fading of fast-mode tile overlaps: weights, tile cuts and the streaming blender."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given
from hypothesis import strategies as st

from gigadiff.vae.blend import OverlapBlender, even_cuts, ramp, tile_span
from gigadiff.vae.tiles import Collector


def test_a_rising_ramp_and_the_neighbours_falling_ramp_sum_to_one():
    zone = 6
    left = ramp(0, 20, zone // 2)  # tile ending in the zone
    right = ramp(zone // 2, 15, 0)  # tile starting in it
    assert torch.allclose(left[-zone:] + right[:zone], torch.ones(zone), atol=1e-6)
    assert torch.all(left[:-zone] == 1) and torch.all(right[zone:] == 1)
    assert torch.all(torch.diff(right[:zone]) > 0)


@given(st.integers(1, 400), st.integers(1, 64), st.sampled_from([1, 8]))
def test_even_cuts_cover_the_axis_in_near_equal_aligned_tiles(size, core, unit):
    core *= unit
    size *= unit
    cuts = even_cuts(size, core, unit)
    assert cuts[0] == 0 and cuts[-1] == size
    lengths = [b - a for a, b in itertools.pairwise(cuts)]
    assert all(n > 0 and n % unit == 0 for n in lengths)
    assert max(lengths) <= core + unit
    if len(lengths) > 1:
        assert min(lengths) >= core // 2 - unit


def blend_tiles(tiles: dict, rows: list[int], cols: list[int], margin: int) -> torch.Tensor:
    """Feed row-major tiles (tile (i, j) -> its output over its span) through the blender; return the image."""
    height, width = rows[-1], cols[-1]
    collect = Collector()
    blender = OverlapBlender(collect, width)
    emitted = []

    def record(y0, x0, t):
        emitted.append((y0, x0, t.shape[2], t.shape[3]))
        collect(y0, x0, t)

    blender.sink = record
    for i, (y0, y1) in enumerate(itertools.pairwise(rows)):
        for j, (x0, x1) in enumerate(itertools.pairwise(cols)):
            span = tile_span(y0, y1, x0, x1, height, width, margin)
            blender.add(span, tiles[i, j](span))
    # the emitted rectangles tile the image in rows of equal height, row-major, as StripAssembler needs
    for _, group in itertools.groupby(emitted, key=lambda e: e[0]):
        group = list(group)
        assert len({g[2] for g in group}) == 1
        assert [g[1] for g in group] == sorted(g[1] for g in group) and group[0][1] == 0
        assert group[-1][1] + group[-1][3] == width
    assert sum(g[2] for g in emitted if g[1] == 0) == height
    return collect.image


def test_tiles_that_agree_are_reassembled_exactly():
    """Weights sum to one everywhere: tiles cut from one image come back as that image."""
    image = torch.randn(2, 3, 50, 70)
    rows, cols = [0, 16, 34, 50], [0, 24, 40, 70]

    def cut(span):
        (r0, r1), (c0, c1) = span.rows, span.cols
        return image[:, :, r0:r1, c0:c1]

    tiles = {(i, j): cut for i in range(3) for j in range(3)}
    assert torch.allclose(blend_tiles(tiles, rows, cols, margin=4), image, atol=1e-6)


def test_tiles_that_disagree_meet_in_a_ramp_not_a_step():
    """Constant tiles of different values: across each cut the image climbs in equal small steps."""
    rows, cols = [0, 20, 40], [0, 24, 48]
    values = {(0, 0): 0.0, (0, 1): 1.0, (1, 0): 2.0, (1, 1): 3.0}
    tiles = {k: (lambda span, v=v: torch.full((1, 1, *(b - a for a, b in (span.rows, span.cols))), v))
             for k, v in values.items()}  # fmt: skip
    margin = 3
    out = blend_tiles(tiles, rows, cols, margin)[0, 0]
    row = out[5]  # inside tile row 0, across the vertical cut at x = 24
    steps = torch.diff(row)
    zone = steps[24 - margin - 1 : 24 + margin]  # pixel centres of the 2m-px zone: half steps at its ends
    assert torch.allclose(zone[1:-1], torch.full((2 * margin - 1,), 1 / (2 * margin)))
    assert torch.allclose(zone[[0, -1]], torch.full((2,), 1 / (4 * margin)))
    assert torch.all(steps[: 24 - margin - 1] == 0) and torch.all(steps[24 + margin :] == 0)
    col = out[:, 40]  # inside tile column 1, across the horizontal cut at y = 20: from 1 to 3
    assert float(col[0]) == 1.0 and float(col[-1]) == 3.0
    assert float(torch.diff(col).max()) <= 2 / (2 * margin) + 1e-6
    assert float(out[20 - margin - 1, 24 - margin - 1]) == 0.0 and float(out[-1, -1]) == 3.0
