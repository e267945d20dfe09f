"""Heightmap files: 16-bit PNG (quantised over the map's own height range) or float32 TIFF (exact metres).

Both carry the generation parameters and the height range, so the metres can be recovered from the file
alone: height = height_min_m + value / 65535 * (height_max_m - height_min_m) for the PNG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gigadiff.io.files import publish, relief_path
from gigadiff.io.relief import shaded_relief
from gigadiff.io.writers import png_info, png_metadata, write_sidecar

HEIGHTMAP_SUFFIXES = (".png", ".tif", ".tiff")


def height_metadata(heights: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        **meta,
        "height_unit": "m",
        "height_min_m": float(heights.min()),
        "height_max_m": float(heights.max()),
    }


def quantise_16bit(heights: np.ndarray) -> np.ndarray:
    lo, hi = float(heights.min()), float(heights.max())
    scale = 65535.0 / (hi - lo) if hi > lo else 0.0
    return np.round((heights - lo) * scale).astype(np.uint16)


def _save_png16(values: np.ndarray, path: Path, meta: dict[str, Any]) -> None:
    Image.fromarray(values).save(path, format="PNG", pnginfo=png_info(meta))  # uint16 -> mode I;16


def _save_tiff(heights: np.ndarray, path: Path, meta: dict[str, Any]) -> None:
    import tifffile

    tifffile.imwrite(path, heights.astype(np.float32), description=json.dumps(meta, sort_keys=True),
                     compression="zlib", metadata=None)  # fmt: skip


def write_heightmap(heights: np.ndarray, path: Path, meta: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    """Write the heightmap, its shaded relief (`<stem>.relief.png`) and a JSON sidecar; return the metadata."""
    meta = height_metadata(heights, meta)
    if path.suffix.lower() == ".png":
        values = quantise_16bit(heights)
        publish(path, lambda tmp: _save_png16(values, tmp, meta), overwrite)
    else:
        publish(path, lambda tmp: _save_tiff(heights, tmp, meta), overwrite)
    relief = Image.fromarray(shaded_relief(heights))
    publish(relief_path(path), lambda tmp: relief.save(tmp, format="PNG"), overwrite)
    write_sidecar(path, meta, overwrite)
    return meta


def read_heightmap(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Heights in metres and the metadata, from a file written by `write_heightmap`."""
    if path.suffix.lower() == ".png":
        with Image.open(path) as im:
            meta = png_metadata(im)
            values = np.asarray(im, dtype=np.float64)
        lo, hi = meta["height_min_m"], meta["height_max_m"]
        return (lo + values / 65535.0 * (hi - lo)).astype(np.float32), meta
    import tifffile

    with tifffile.TiffFile(path) as tif:
        meta = json.loads(tif.pages[0].description)
        return tif.asarray(), meta
