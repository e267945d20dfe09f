"""Streaming writers: tiles in, PNG or BigTIFF pyramid out, equal to writing the whole image at once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from gigadiff.io.images import tensor_to_pil
from gigadiff.io.streaming import PYRAMID_MIN, StripAssembler, write_streamed
from gigadiff.io.writers import read_png_metadata

META = {"prompt": "p", "negative": "", "steps": 2, "scheduler": "ddim", "guidance": 7.5, "seed": 4,
        "width": 1, "height": 1, "model": "m", "tile": 512, "overlap": 64, "weights": "gaussian", "shift": True,
        "gigadiff_version": "0"}  # fmt: skip


def image(h: int, w: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([x, y, x * y])[None]


def stream(img: torch.Tensor, tile: int):
    def decode(sink: StripAssembler) -> None:
        h, w = img.shape[2:]
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                sink(y0, x0, img[:, :, y0 : y0 + tile, x0 : x0 + tile])

    return decode


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_streamed_file_equals_the_whole_image(tmp_path, suffix):
    img = image(200, 328)
    out = tmp_path / f"x{suffix}"
    write_streamed(stream(img, 64), out, 328, 200, META)
    expected = np.asarray(tensor_to_pil(img)[0])
    if suffix == ".png":
        assert np.array_equal(np.asarray(Image.open(out)), expected)
        assert read_png_metadata(out)["seed"] == 4
    else:
        with tifffile.TiffFile(out) as tif:
            assert np.array_equal(tif.pages[0].asarray(), expected)
            assert json.loads(tif.pages[0].description)["seed"] == 4
    assert json.loads((tmp_path / "x.json").read_text())["seed"] == 4


def test_tiff_pyramid_levels_halve_down_to_the_minimum(tmp_path):
    w, h = 4 * PYRAMID_MIN + 8, 2 * PYRAMID_MIN
    img = image(h, w)
    out = tmp_path / "big.tif"
    write_streamed(stream(img, 256), out, w, h, META)
    with tifffile.TiffFile(out) as tif:
        base = tif.pages[0]
        levels = [base.shape] + [p.shape for p in base.pages]
        assert tif.is_bigtiff and base.is_tiled
        assert levels == [(h, w, 3), (h // 2, w // 2, 3), (h // 4, w // 4, 3)]
        full = base.asarray().astype(np.float32)
        half = base.pages[0].asarray().astype(np.float32)
    assert np.abs(half - full[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3))).max() <= 1


def test_tiles_out_of_order_and_missing_rows_are_refused(tmp_path):
    def out_of_order(sink: StripAssembler) -> None:
        sink(64, 0, image(64, 64))

    with pytest.raises(RuntimeError, match="row by row"):
        write_streamed(out_of_order, tmp_path / "a.png", 64, 128, META)

    def short(sink: StripAssembler) -> None:
        sink(0, 0, image(64, 64))

    with pytest.raises(RuntimeError, match="incomplete"):
        write_streamed(short, tmp_path / "b.png", 64, 128, META)
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
