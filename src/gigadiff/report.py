"""A quality report for an image file: seams on its tile borders, continuity across its edges, duplication,
and grid anisotropy (straight axis-aligned edges, needing no grid).

The tile borders come from the generation metadata gigadiff writes next to (and into) its outputs, which
records everything needed to rebuild the grid of every step (size, tile, overlap, shift, seed, steps and the
VAE factor); for other images they come from a tile size and overlap the user gives (an unshifted grid, as
most tiled tools use). Pixels are read whole: this is an analysis tool for images that fit in memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gigadiff.errors import GigadiffError
from gigadiff.geometry import GridPlan, tile_grid
from gigadiff.io.images import open_image, require_file
from gigadiff.metrics import (
    Duplication,
    EdgeContinuity,
    GridAnisotropy,
    SeamScore,
    duplication,
    edge_continuity,
    grid_anisotropy,
    grid_borders,
)
from gigadiff.metrics import seam_score as measure_seams
from gigadiff.settings import wrap_axes


@dataclass(frozen=True)
class ImageReport:
    path: str
    width: int
    height: int
    borders_from: str
    """"metadata", "options" or "none" (no tile grid known: no seam score)."""
    seams: SeamScore | None
    edges: EdgeContinuity
    duplication: Duplication
    grid: GridAnisotropy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_pixels(path: Path) -> np.ndarray:
    """[H, W] or [H, W, C] float64 pixels of a PNG/TIFF/JPEG (16-bit heightmaps included)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        require_file(path, "image")
        return np.asarray(tifffile.imread(path), dtype=np.float64)
    with open_image(path) as im:
        return np.asarray(im.convert("RGB") if im.mode in ("P", "RGBA", "LA", "CMYK") else im, dtype=np.float64)


def read_metadata(path: Path) -> dict[str, Any] | None:
    """gigadiff's generation metadata for an output: its JSON sidecar, else the PNG's text chunk, else None."""
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            return json.loads(sidecar.read_text())
        except json.JSONDecodeError as e:
            raise GigadiffError(f"metadata sidecar {sidecar} is not valid JSON: {e}") from None
    if path.suffix.lower() == ".png":
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get("gigadiff")
        return json.loads(text) if text else None
    return None


def borders_from_metadata(meta: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Every tile border of every step of the generation `meta` describes, in image pixels."""
    f = int(meta.get("vae_scale_factor", 8))
    wrap = wrap_axes(meta.get("tileable"))
    plan = GridPlan(meta["height"] // f, meta["width"] // f, meta["tile"] // f, meta["overlap"] // f,
                    shifted=bool(meta["shift"]), seed=int(meta["seed"]), wrap=wrap)  # fmt: skip
    return grid_borders((plan.grid(i) for i in range(int(meta["steps"]))), scale=f)


def image_report(path: Path, tile: int | None = None, overlap: int = 0, crops: int = 4) -> ImageReport:
    """Measure `path`. With `tile`, seams are scored on that (unshifted) grid instead of the recorded ones."""
    pixels = read_pixels(path)
    height, width = pixels.shape[:2]
    meta = read_metadata(path) if tile is None else None
    if tile is not None:
        if not 0 <= overlap < tile:
            raise GigadiffError(f"overlap ({overlap}) must satisfy 0 <= overlap < tile ({tile})")
        rows, cols = grid_borders([tile_grid(height, width, tile, overlap)])
        source = "options"
    elif meta is not None and {"tile", "overlap", "width", "height", "seed", "steps"} <= set(meta):
        if (meta["width"], meta["height"]) != (width, height):
            raise GigadiffError(f"{path} is {width}x{height} but its metadata says {meta['width']}x{meta['height']}")
        rows, cols = borders_from_metadata(meta)
        source = "metadata"
    else:
        rows, cols, source = [], [], "none"
    seams = measure_seams(pixels, rows, cols) if rows or cols else None
    return ImageReport(str(path), width, height, source if seams else "none", seams, edge_continuity(pixels),
                       duplication(pixels, crops), grid_anisotropy(pixels))  # fmt: skip
