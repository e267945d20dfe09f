"""Writers that take an image tile by tile, so an image far larger than RAM never exists whole.

The tiled VAE streams decoded tiles row-major; `StripAssembler` turns them into full-width row strips, and a
`RowWriter` consumes strips: `PngRowWriter` compresses them straight into IDAT chunks, `TiffPyramidWriter`
writes a tiled BigTIFF with pyramid levels. Peak memory is a few strips (plus a tile row of the TIFF), whatever
the image size. Both embed the generation metadata as the PNG writer does.
"""

from __future__ import annotations

import json
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import numpy as np

from gigadiff import interrupts
from gigadiff.events import Listener, NullListener
from gigadiff.io.metadata import parameters_text
from gigadiff.lazy import torch

if TYPE_CHECKING:
    import torch

TIFF_TILE = 256
PYRAMID_MIN = 512
"""Pyramid levels halve until the longest side would drop below this."""


class RowWriter(Protocol):
    def write_rows(self, rows: np.ndarray) -> None:
        """Append full-width rows [n, W, 3] (uint8) below those already written."""

    def close(self) -> None:
        """Finish the file (called once, after the last row)."""


def to_uint8(tile: torch.Tensor) -> np.ndarray:
    """First image of a [B, 3, h, w] tile in [-1, 1] -> [h, w, 3] uint8 (the same rounding as tensor_to_pil)."""
    t = ((tile[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return t.permute(1, 2, 0).cpu().numpy()


class StripAssembler:
    """A tile sink (y0, x0, tile) for row-major tiles that hands completed full-width strips to a RowWriter."""

    def __init__(self, width: int, height: int, writer: RowWriter) -> None:
        self.width, self.height, self.writer = width, height, writer
        self.strip: np.ndarray | None = None
        self.rows_done = 0

    def __call__(self, y0: int, x0: int, tile: torch.Tensor) -> None:
        if y0 != self.rows_done:
            raise RuntimeError(f"tiles must arrive row by row: got y={y0} while expecting {self.rows_done}")
        pixels = to_uint8(tile)
        h, w = pixels.shape[:2]
        if self.strip is None:
            self.strip = np.zeros((h, self.width, 3), dtype=np.uint8)
        self.strip[:, x0 : x0 + w] = pixels
        if x0 + w == self.width:
            interrupts.check()
            self.writer.write_rows(self.strip)
            self.rows_done += h
            self.strip = None

    def close(self) -> None:
        if self.rows_done != self.height:
            raise RuntimeError(f"image incomplete: {self.rows_done} of {self.height} rows written")
        self.writer.close()


class PngRowWriter:
    """An 8-bit RGB PNG written row strip by row strip, with `parameters` and `gigadiff` text chunks."""

    def __init__(self, path: Path, width: int, height: int, meta: dict[str, Any]) -> None:
        self.f: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.zip = zlib.compressobj(6)
        self.f.write(b"\x89PNG\r\n\x1a\n")
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        self._chunk(b"tEXt", b"parameters\x00" + parameters_text(meta).encode("latin-1", "replace"))
        self._chunk(b"tEXt", b"gigadiff\x00" + json.dumps(meta, sort_keys=True).encode("latin-1", "replace"))

    def _chunk(self, kind: bytes, data: bytes) -> None:
        self.f.write(struct.pack(">I", len(data)) + kind + data)
        self.f.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    def write_rows(self, rows: np.ndarray) -> None:
        n, w = rows.shape[:2]
        raw = np.zeros((n, 1 + 3 * w), dtype=np.uint8)  # filter byte 0 (None) before each row
        raw[:, 1:] = rows.reshape(n, 3 * w)
        data = self.zip.compress(raw.tobytes())
        if data:
            self._chunk(b"IDAT", data)

    def close(self) -> None:
        self._chunk(b"IDAT", self.zip.flush())
        self._chunk(b"IEND", b"")
        self.f.close()


class TiffPyramidWriter:
    """A tiled BigTIFF (deflate) with pyramid levels in SubIFDs, built from row strips.

    Rows go to a temporary raw file as they arrive; on close the full-resolution page is written from it tile
    row by tile row while each level's 2x2-averaged rows are spooled for the next level, so RAM holds one tile
    row per level at most.
    """

    def __init__(self, path: Path, width: int, height: int, meta: dict[str, Any]) -> None:
        self.path, self.width, self.height, self.meta = path, width, height, meta
        self.spool = tempfile.TemporaryFile(dir=path.parent)  # noqa: SIM115 - closed in close()
        self.on_level: Callable[[], None] = lambda: None
        """Called after each pyramid level is written (progress)."""

    def write_rows(self, rows: np.ndarray) -> None:
        self.spool.write(np.ascontiguousarray(rows).tobytes())

    def levels(self) -> int:
        n, side = 0, max(self.width, self.height)
        while side // 2 >= PYRAMID_MIN:
            side //= 2
            n += 1
        return n

    def close(self) -> None:
        import tifffile

        sub = self.levels()
        spool, w, h = self.spool, self.width, self.height
        description = json.dumps(self.meta, sort_keys=True)
        with tifffile.TiffWriter(self.path, bigtiff=True) as tif:
            for level in range(sub + 1):
                nxt = tempfile.TemporaryFile(dir=self.path.parent) if level < sub else None  # noqa: SIM115
                spool.seek(0)
                tiles = _tiles(spool, w, h, nxt)
                options: dict[str, Any] = {"subifds": sub, "description": description, "software": "gigadiff"}
                if level:
                    options = {"subfiletype": 1}
                tif.write(tiles, shape=(h, w, 3), dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE), photometric="rgb",
                          compression="zlib", metadata=None, **options)  # fmt: skip
                spool.close()
                self.on_level()
                if nxt is not None:
                    spool, w, h = nxt, max(1, w // 2), max(1, h // 2)


def _tiles(spool: BinaryIO, width: int, height: int, half: BinaryIO | None) -> Iterator[np.ndarray]:
    """Row-major TIFF tiles of a raw RGB image in `spool`; meanwhile the 2x2 average goes to `half`."""
    row_bytes = width * 3
    for y0 in range(0, height, TIFF_TILE):
        n = min(TIFF_TILE, height - y0)
        band = np.frombuffer(spool.read(row_bytes * n), dtype=np.uint8).reshape(n, width, 3)
        if half is not None:  # before yielding: the writer stops pulling after the last tile
            even = band[: n - n % 2, : width - width % 2].astype(np.uint16)
            avg = (even[0::2, 0::2] + even[1::2, 0::2] + even[0::2, 1::2] + even[1::2, 1::2] + 2) // 4
            half.write(avg.astype(np.uint8).tobytes())
        for x0 in range(0, width, TIFF_TILE):
            tile = np.zeros((TIFF_TILE, TIFF_TILE, 3), dtype=np.uint8)
            part = band[:, x0 : x0 + TIFF_TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile


def row_writer(path: Path, width: int, height: int, meta: dict[str, Any]) -> RowWriter:
    """The streaming writer for an output path: BigTIFF pyramid for .tif/.tiff, PNG otherwise."""
    if path.suffix.lower() in (".tif", ".tiff"):
        return TiffPyramidWriter(path, width, height, meta)
    return PngRowWriter(path, width, height, meta)


def write_streamed(
    decode: Callable[[StripAssembler], None],
    path: Path,
    width: int,
    height: int,
    meta: dict[str, Any],
    overwrite: bool = False,
    listener: Listener | None = None,
) -> None:
    """Write an image produced tile by tile by `decode(sink)` to `path` (PNG or BigTIFF), plus its sidecar.
    `listener` hears the BigTIFF's pyramid, written after the last tile, as a phase of its levels."""
    from gigadiff.io.files import publish
    from gigadiff.io.writers import write_sidecar

    events = listener or NullListener()

    def write(tmp: Path) -> None:
        writer = row_writer(tmp, width, height, meta)
        assembler = StripAssembler(width, height, writer)
        decode(assembler)
        if isinstance(writer, TiffPyramidWriter):
            events.on_phase("writing BigTIFF pyramid", writer.levels() + 1)
            writer.on_level = lambda: events.on_advance(1)
        assembler.close()

    publish(path, write, overwrite)
    write_sidecar(path, meta, overwrite)
