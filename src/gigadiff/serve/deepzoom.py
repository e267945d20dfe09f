"""A Deep Zoom (DZI) view of an output, read tile by tile from the BigTIFF pyramid the writer makes.

Deep Zoom numbers its levels from 1x1 px (level 0) to the full image (level `max_level`); level L is the image
scaled by 2^(L - max_level), each side rounded up. The BigTIFF (gigadiff.io.streaming) holds the full image and
its 2x-reduced pages in 256-px tiles down to a side of about 512 px, so a Deep Zoom tile of those levels is one
TIFF tile: read from its byte offset and decoded alone, never the page around it. Below the smallest page (less
than 1024 px a side) the small page is read whole and reduced. The pyramid's pages round each side down where
Deep Zoom rounds up: the one missing row or column repeats its neighbour.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gigadiff.io.streaming import TIFF_TILE, TiffPyramidWriter

TILE = TIFF_TILE
FORMATS = {"jpeg": "JPEG", "png": "PNG"}
MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


class NoTile(LookupError):
    """A level, column, row or format outside the pyramid."""


@dataclass(frozen=True)
class Pyramid:
    """The shape of a pyramid file: its pages' (width, height), full size first."""

    path: Path
    pages: tuple[tuple[int, int], ...]

    @property
    def width(self) -> int:
        return self.pages[0][0]

    @property
    def height(self) -> int:
        return self.pages[0][1]

    @property
    def max_level(self) -> int:
        return max_level(self.width, self.height)

    def level_size(self, level: int) -> tuple[int, int]:
        return level_size(self.width, self.height, level)

    def dzi(self, fmt: str = "jpeg") -> str:
        return dzi_xml(self.width, self.height, fmt)


def max_level(width: int, height: int) -> int:
    return math.ceil(math.log2(max(width, height))) if max(width, height) > 1 else 0


def level_size(width: int, height: int, level: int) -> tuple[int, int]:
    scale = 2 ** (max_level(width, height) - level)
    return -(-width // scale), -(-height // scale)


def tile_count(width: int, height: int, level: int) -> tuple[int, int]:
    """Columns and rows of Deep Zoom tiles at `level`."""
    w, h = level_size(width, height, level)
    return -(-w // TILE), -(-h // TILE)


def dzi_xml(width: int, height: int, fmt: str = "jpeg") -> str:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" TileSize="{TILE}" Overlap="0" '
            f'Format="{fmt}"><Size Width="{width}" Height="{height}"/></Image>\n')  # fmt: skip


def open_pyramid(path: Path) -> Pyramid:
    """The pages of an RGB BigTIFF pyramid (ValueError if the file is not one)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        shapes = [level.shape for level in levels]
    if any(len(s) != 3 or s[2] != 3 for s in shapes):
        raise ValueError(f"{path} is not an RGB image pyramid")
    return Pyramid(path, tuple((s[1], s[0]) for s in shapes))


def _page_tile(tif: Any, page_index: int, col: int, row: int) -> np.ndarray:
    """One stored tile of a pyramid page (of an open tifffile.TiffFile), cropped to the page."""
    page = tif.series[0].levels[page_index].keyframe
    across = -(-page.imagewidth // page.tilewidth)
    index = row * across + col
    handle = tif.filehandle
    handle.seek(page.dataoffsets[index])
    data = handle.read(page.databytecounts[index])
    segment = page.decode(data, index)[0][0]
    return segment[: page.imagelength - row * TILE, : page.imagewidth - col * TILE]


def tile_pixels(pyramid: Pyramid, level: int, col: int, row: int) -> np.ndarray:
    """The RGB pixels of Deep Zoom tile (level, col, row)."""
    import tifffile
    from PIL import Image

    if not 0 <= level <= pyramid.max_level:
        raise NoTile(f"level {level} is outside 0..{pyramid.max_level}")
    cols, rows = tile_count(pyramid.width, pyramid.height, level)
    if not (0 <= col < cols and 0 <= row < rows):
        raise NoTile(f"tile {col}_{row} is outside level {level} ({cols}x{rows} tiles)")
    w, h = pyramid.level_size(level)
    want_w, want_h = min(TILE, w - col * TILE), min(TILE, h - row * TILE)
    page = pyramid.max_level - level
    with tifffile.TiffFile(pyramid.path) as tif:
        if page < len(pyramid.pages):
            page_w, page_h = pyramid.pages[page]
            stored_col, stored_row = min(col, (page_w - 1) // TILE), min(row, (page_h - 1) // TILE)
            pixels = _page_tile(tif, page, stored_col, stored_row)
            if stored_col != col:  # a tile of Deep Zoom's one extra column: the page's last column repeats
                pixels = pixels[:, -1:]
            if stored_row != row:
                pixels = pixels[-1:]
        else:  # below the smallest page: reduce it whole (it is under 1024 px a side)
            small = Image.fromarray(tif.series[0].levels[-1].asarray())
            reduced = np.asarray(small.resize((w, h), Image.Resampling.BOX))
            pixels = reduced[row * TILE : row * TILE + want_h, col * TILE : col * TILE + want_w]
    pad_h, pad_w = want_h - pixels.shape[0], want_w - pixels.shape[1]
    if pad_h or pad_w:  # the page rounded its side down where Deep Zoom rounds up
        pixels = np.pad(pixels, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return pixels


def tile_bytes(pyramid: Pyramid, level: int, col: int, row: int, fmt: str) -> bytes:
    """Deep Zoom tile (level, col, row) encoded as `fmt` ("jpeg" or "png")."""
    from PIL import Image

    if fmt not in FORMATS:
        raise NoTile(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    buffer = io.BytesIO()
    image = Image.fromarray(tile_pixels(pyramid, level, col, row))
    image.save(buffer, format=FORMATS[fmt], **({"quality": 90} if fmt == "jpeg" else {}))
    return buffer.getvalue()


def write_pyramid(image_path: Path, pyramid_path: Path, rows_per_strip: int = 256) -> None:
    """A BigTIFF pyramid of an image that is not one (a heightmap's shaded relief), to view it in Deep Zoom."""
    from PIL import Image

    from gigadiff.io.files import publish

    with Image.open(image_path) as opened:
        image = opened.convert("RGB")

    def write(tmp: Path) -> None:
        writer = TiffPyramidWriter(tmp, image.width, image.height, {"source": image_path.name})
        for y in range(0, image.height, rows_per_strip):
            strip = image.crop((0, y, image.width, min(image.height, y + rows_per_strip)))
            writer.write_rows(np.asarray(strip))
        writer.close()

    publish(pyramid_path, write, overwrite=True)
