"""A quality report for an image file: seams on its tile borders, continuity across its edges, duplication,
and grid anisotropy (straight axis-aligned edges, needing no grid).

The tile borders come from the generation metadata gigadiff writes next to (and into) its outputs: its resolved
settings, its model's description and the timesteps that ran, from which gigadiff.grids rebuilds every step's
grid with the function the run used; for other images they come from a tile size and overlap the user gives
(an unshifted grid, as most tiled tools use). Pixels are read whole: this is an analysis tool for images that
fit in memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gigadiff.errors import GigadiffError
from gigadiff.facts import ModelInfo
from gigadiff.geometry import tile_grid
from gigadiff.grids import StepRange, run_grids
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
from gigadiff.settings import GenerationSettings


@dataclass(frozen=True)
class ImageReport:
    path: str
    width: int
    height: int
    borders_from: str
    """"metadata", "options" or "none" (no tile grid known: no seam score)."""
    seams: SeamScore | None
    edges: EdgeContinuity
    tileable: bool
    """Whether the image was made to tile (its metadata says so), so that its edge continuity is a seam measure."""
    duplication: Duplication
    grid: GridAnisotropy
    made_with: str = ""
    """What made it, from its metadata: model, weights, LoRAs, ControlNets, upscaler ("" without metadata)."""

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


RECORDED = ("settings", "model_info", "timesteps")
"""What a gigadiff output's metadata must hold for its grids to be rebuilt."""


def borders_from_metadata(meta: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Every tile border of every step that ran in the generation `meta` describes, in image pixels."""
    settings = GenerationSettings.from_dict(meta["settings"])
    info = ModelInfo.from_dict(meta["model_info"])
    steps = StepRange(int(meta["timesteps"]["first"]), int(meta["timesteps"]["count"]))
    return grid_borders(run_grids(settings, info, steps), scale=info.vae_scale_factor)


def image_report(path: Path, tile: int | None = None, overlap: int = 0, crops: int = 4) -> ImageReport:
    """Measure `path`. With `tile`, seams are scored on that (unshifted) grid instead of the recorded ones."""
    pixels = read_pixels(path)
    height, width = pixels.shape[:2]
    meta = read_metadata(path)
    if meta is not None and {"width", "height"} <= set(meta) and (meta["width"], meta["height"]) != (width, height):
        raise GigadiffError(f"{path} is {width}x{height} but its metadata says {meta['width']}x{meta['height']}")
    if tile is not None:
        if not 0 <= overlap < tile:
            raise GigadiffError(f"overlap ({overlap}) must satisfy 0 <= overlap < tile ({tile})")
        rows, cols = grid_borders([tile_grid(height, width, tile, overlap)])
        source = "options"
    elif meta is not None and set(RECORDED) <= set(meta):
        rows, cols = borders_from_metadata(meta)
        source = "metadata"
    else:
        rows, cols, source = [], [], "none"
    seams = measure_seams(pixels, rows, cols) if rows or cols else None
    tileable = meta is not None and meta.get("tileable", "none") != "none"
    return ImageReport(str(path), width, height, source if seams else "none", seams, edge_continuity(pixels),
                       tileable, duplication(pixels, crops), grid_anisotropy(pixels),
                       made_with(meta) if meta else "")  # fmt: skip


def made_with(meta: dict[str, Any]) -> str:
    """One line of what made an output: its model and how it ran, the LoRAs (file x scale), the ControlNets (with
    scale and schedule window) and the upscaler that went into it."""
    setup = meta.get("model_setup", {})
    quantized = setup.get("quantization")
    how = [setup.get("dtype", meta.get("dtype", "")), f"offload {setup['offload']}" if setup.get("offload") else "",
           f"{quantized} {'/'.join(setup.get('quantized_types', []))}".strip() if quantized else "",
           setup.get("transformer", "")]  # fmt: skip
    parts = [f"model {meta.get('model', '?')} ({', '.join(h for h in how if h)})"]
    loras = setup.get("loras") or []
    if loras:
        parts.append("LoRAs " + ", ".join(f"{lora['file']} x{lora['scale']:g}" for lora in loras))
    controls = meta.get("control") or []
    if controls:
        from gigadiff.backends.control import parse_control

        specs = [parse_control(text) for text in controls]
        parts.append("ControlNets " + ", ".join(f"{Path(s.model).name} x{s.scale:g} ({s.start:g}-{s.end:g})"
                                                for s in specs))  # fmt: skip
    if meta.get("upscaler"):
        parts.append(f"upscaler {Path(meta['upscaler']).name}")
    return "; ".join(parts)
