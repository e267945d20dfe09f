"""The tile grids of a run, derived in one place from its resolved settings and its model's description.

The recipes step on these grids, the default tile batch counts them, and `gigadiff metrics` rebuilds a finished
image's tile borders with the same function from the settings and model facts its metadata records (the model's
rim and token size included, and, from the run's own record, which timesteps ran: an img2img run starts late,
a progressive run's final stage is the one whose borders are in the image). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from gigadiff.facts import ModelInfo
from gigadiff.geometry import GridPlan, Tile, TileGrid
from gigadiff.settings import GenerationSettings

DEFAULT_TILE_BATCH = 4
"""Tiles per model call unless asked otherwise (fewer when a step has fewer tiles)."""


def border_pad(settings: GenerationSettings, info: ModelInfo) -> tuple[int, int]:
    """Canvas pixels added beyond the image on each side (top and bottom, left and right) for a model whose
    output is unreliable within `edge_margin` of a tile's edge (0 for other models).

    Inside the canvas every pixel is covered by two or more tiles whose predictions fusion averages, and every
    rim by a neighbour's interior; at the canvas border nothing covers the rim, and a band as deep as the
    overlap is covered by the edge tile alone, unaveraged, so its values spread wider than anywhere inside
    (terrain: the highest 0.5% of a map gathered in its outer 16 px, at the model's clamp). So the canvas is
    made larger than the image by the overlap (at least the rim; whole tokens) on each side that is not
    wrapped, and the run keeps only the image: its border is covered like its middle.
    """
    return rim_pad(settings.overlap, settings.wrap, info)


def rim_pad(overlap_px: int, wrap: tuple[bool, bool], info: ModelInfo) -> tuple[int, int]:
    """`border_pad` of a canvas overlapping its tiles by overlap_px, wrapped on the `wrap` axes."""
    if not info.edge_margin:
        return (0, 0)
    m = max(info.edge_margin, overlap_px // info.vae_scale_factor)
    m = -(-m // info.latent_multiple) * info.latent_multiple
    return (0 if wrap[0] else m, 0 if wrap[1] else m)


def grid_plan(settings: GenerationSettings, info: ModelInfo, height_px: int | None = None,
              width_px: int | None = None) -> GridPlan:  # fmt: skip
    """The per-step tile grid of resolved settings, in canvas pixels of the padded canvas (see border_pad), of
    a canvas of height_px x width_px instead of the settings' own size for a progressive run's earlier stages."""
    s = settings
    return plan_for(height_px or s.height, width_px or s.width, s.tile, s.overlap, s.shift, s.seed, s.wrap, info)


def plan_for(height_px: int, width_px: int, tile_px: int, overlap_px: int, shifted: bool, seed: int,
             wrap: tuple[bool, bool], info: ModelInfo) -> GridPlan:  # fmt: skip
    """The per-step tile grid of an image of height_px x width_px tiled by `tile_px` with `overlap_px` (what
    `grid_plan` reads from settings, given one by one while a request is being resolved)."""
    f = info.vae_scale_factor
    py, px = rim_pad(overlap_px, wrap, info)
    return GridPlan(
        height=height_px // f + 2 * py,
        width=width_px // f + 2 * px,
        tile=tile_px // f,
        overlap=overlap_px // f,
        shifted=shifted,
        seed=seed,
        rim_overlap=2 * info.edge_margin,
        wrap=wrap,
        unit=info.latent_multiple,
    )


def default_tile_batch(tiles_per_step: int) -> int:
    """Tiles per model call unless asked: the largest divisor of a step's tiles up to DEFAULT_TILE_BATCH.

    Every call has one shape (gigadiff.executors.local), so a batch that does not divide the tiles fills its last
    call with copies whose predictions are thrown away: 5 tiles in calls of 4 evaluated 8 (2.0 latent px per canvas
    px on bench/panorama.py's canvas instead of 1.25). A divisor wastes nothing: 5 tiles run as 5 calls of 1,
    81 as 27 of 3. It depends on the canvas, never on the number of processes, so that every layout computes every
    tile in a call of the same shape.
    """
    return next(b for b in range(min(DEFAULT_TILE_BATCH, max(tiles_per_step, 1)), 0, -1) if tiles_per_step % b == 0)


@dataclass(frozen=True)
class StepRange:
    """Which timestep indices of a run's (last) stage ran: [first, count)."""

    first: int
    count: int


def run_grids(settings: GenerationSettings, info: ModelInfo, steps: StepRange) -> list[TileGrid]:
    """The grids of the timesteps that ran on the final canvas, in the image's canvas pixels (tiles of the
    padding moved by it, so that a border outside the image lies outside)."""
    plan = grid_plan(settings, info)
    py, px = border_pad(settings, info)
    h, w = plan.height - 2 * py, plan.width - 2 * px
    return [TileGrid(h, w, tuple(Tile(t.y - py, t.x - px, t.h, t.w) for t in plan.grid(i)), plan.wrap)
            for i in range(steps.first, steps.count)]  # fmt: skip
