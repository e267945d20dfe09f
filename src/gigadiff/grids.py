"""The tile grids of a run, derived in one place from its resolved settings and its model's description.

The recipes step on these grids, the default tile batch counts them, and `gigadiff metrics` rebuilds a finished
image's tile borders with the same function from the settings and model facts its metadata records (the model's
rim and token size included, and, from the run's own record, which timesteps ran: an img2img run starts late,
a progressive run's final stage is the one whose borders are in the image). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from gigadiff.backends.base import ModelInfo
from gigadiff.geometry import GridPlan, Tile, TileGrid
from gigadiff.settings import DEFAULT_TILE_BATCH, GenerationSettings


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
    assert settings.overlap is not None, "resolve first"
    if not info.edge_margin:
        return (0, 0)
    m = max(info.edge_margin, settings.overlap // info.vae_scale_factor)
    m = -(-m // info.latent_multiple) * info.latent_multiple
    return (0 if settings.wrap[0] else m, 0 if settings.wrap[1] else m)


def grid_plan(settings: GenerationSettings, info: ModelInfo, height_px: int | None = None,
              width_px: int | None = None) -> GridPlan:  # fmt: skip
    """The per-step tile grid of resolved settings, in canvas pixels of the padded canvas (see border_pad), of
    a canvas of height_px x width_px instead of the settings' own size for a progressive run's earlier stages."""
    assert settings.width and settings.height and settings.tile and settings.overlap is not None, "resolve first"
    f = info.vae_scale_factor
    py, px = border_pad(settings, info)
    return GridPlan(
        height=(height_px or settings.height) // f + 2 * py,
        width=(width_px or settings.width) // f + 2 * px,
        tile=settings.tile // f,
        overlap=settings.overlap // f,
        shifted=settings.shift,
        seed=settings.seed,
        rim_overlap=2 * info.edge_margin,
        wrap=settings.wrap,
        unit=info.latent_multiple,
    )


def tile_batch(settings: GenerationSettings, info: ModelInfo) -> int:
    """Tiles per model call: the requested batch, else the largest of DEFAULT_TILE_BATCH, 3, 2 that divides a
    step's tiles (no call filled up with copies, gigadiff.executors.local), DEFAULT_TILE_BATCH if none does,
    and never more than the step's tiles.

    It depends on the canvas, never on the number of processes, so that every layout computes every tile in a
    batch of the same shape.
    """
    if settings.tile_batch is not None:
        return settings.tile_batch
    n = grid_plan(settings, info).tiles_per_step
    even = next((b for b in range(DEFAULT_TILE_BATCH, 1, -1) if n % b == 0), DEFAULT_TILE_BATCH)
    return max(1, min(even, n))


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
