"""Deep Zoom tiles read from the BigTIFF pyramid: every level's tiles put back together are that level's image."""

from __future__ import annotations

import io
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from gigadiff.io.streaming import TiffPyramidWriter
from gigadiff.serve import deepzoom


def _pyramid(tmp_path, width: int, height: int, seed: int = 0):
    """A pyramid of an image with structure at every scale (ramps, blocks of 97 x 61 px) and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pattern = np.stack([x * 255 // width, y * 255 // height, ((x // 97 + y // 61) % 2) * 255], axis=-1)
    image = np.clip(pattern + rng.integers(-20, 21, (height, width, 3)), 0, 255).astype(np.uint8)
    path = tmp_path / "image.tif"
    writer = TiffPyramidWriter(path, width, height, {"seed": seed})
    for y in range(0, height, 100):  # strips, as the tiled VAE hands them over
        writer.write_rows(image[y : y + 100])
    writer.close()
    return image, deepzoom.open_pyramid(path)


def _assembled(pyramid, level: int) -> np.ndarray:
    cols, rows = deepzoom.tile_count(pyramid.width, pyramid.height, level)
    return np.concatenate([np.concatenate([deepzoom.tile_pixels(pyramid, level, c, r) for c in range(cols)], axis=1)
                           for r in range(rows)])  # fmt: skip


def test_levels_follow_the_deep_zoom_rule():
    assert deepzoom.max_level(1500, 1100) == 11  # 2^11 = 2048 >= 1500
    assert deepzoom.level_size(1500, 1100, 11) == (1500, 1100)
    assert deepzoom.level_size(1500, 1100, 10) == (750, 550)
    assert deepzoom.level_size(1500, 1100, 9) == (375, 275)
    assert deepzoom.level_size(1500, 1100, 8) == (188, 138)  # rounded up
    assert deepzoom.level_size(1500, 1100, 0) == (1, 1)
    assert deepzoom.tile_count(1500, 1100, 11) == (6, 5)
    root = ET.fromstring(deepzoom.dzi_xml(1500, 1100, "png"))
    assert root.attrib["TileSize"] == "256" and root.attrib["Overlap"] == "0" and root.attrib["Format"] == "png"
    size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert size is not None and (size.attrib["Width"], size.attrib["Height"]) == ("1500", "1100")


@pytest.mark.parametrize(("width", "height"), [(1500, 1100), (1025, 517)])
def test_every_level_reassembles_to_its_image(tmp_path, width, height):
    image, pyramid = _pyramid(tmp_path, width, height)
    assert pyramid.pages[0] == (width, height) and len(pyramid.pages) == 2
    top = pyramid.max_level
    assert top == math.ceil(math.log2(max(width, height)))
    np.testing.assert_array_equal(_assembled(pyramid, top), image)
    # the next level is the writer's 2x2-averaged page; Deep Zoom rounds an odd side up: the edge repeats
    w, h = pyramid.level_size(top - 1)
    half = _assembled(pyramid, top - 1)
    assert half.shape == (h, w, 3)
    even = image[: height // 2 * 2, : width // 2 * 2].astype(np.uint16)
    avg = ((even[0::2, 0::2] + even[1::2, 0::2] + even[0::2, 1::2] + even[1::2, 1::2] + 2) // 4).astype(np.uint8)
    np.testing.assert_array_equal(half[: height // 2, : width // 2], avg)
    if width % 2:
        np.testing.assert_array_equal(half[: height // 2, -1], avg[:, -1])
    for level in range(top - 2, -1, -1):  # below the smallest page: reduced from it, each side rounded up
        w, h = pyramid.level_size(level)
        shown = _assembled(pyramid, level).astype(np.int16)
        assert shown.shape == (h, w, 3)
        page_w, page_h = pyramid.pages[1]  # the reduced page covers 2x its size (its sides rounded down)
        covered = Image.fromarray(image[: 2 * page_h, : 2 * page_w])
        direct = np.asarray(covered.resize((w, h), Image.Resampling.BOX)).astype(np.int16)
        # the image's own area means, through the pyramid (measured: 1-2.3 levels on average, from sharp block edges
        # split between its pages' pixels; content of the wrong place or level is 70+ away)
        assert np.abs(shown - direct).mean() <= 3, level
    assert _assembled(pyramid, 0).shape == (1, 1, 3)


def test_tiles_encode_and_refuse_what_is_not_there(tmp_path):
    image, pyramid = _pyramid(tmp_path, 600, 300)
    png = Image.open(io.BytesIO(deepzoom.tile_bytes(pyramid, pyramid.max_level, 2, 1, "png")))
    np.testing.assert_array_equal(np.asarray(png), image[256:300, 512:600])
    jpeg = Image.open(io.BytesIO(deepzoom.tile_bytes(pyramid, pyramid.max_level, 0, 0, "jpeg")))
    assert jpeg.format == "JPEG" and jpeg.size == (256, 256)
    for level, col, row in [(pyramid.max_level + 1, 0, 0), (-1, 0, 0), (pyramid.max_level, 3, 0),
                            (pyramid.max_level, 0, 2), (1, 1, 0)]:  # fmt: skip
        with pytest.raises(deepzoom.NoTile):
            deepzoom.tile_pixels(pyramid, level, col, row)
    with pytest.raises(deepzoom.NoTile, match="format"):
        deepzoom.tile_bytes(pyramid, 0, 0, 0, "gif")


def test_an_image_that_is_not_a_pyramid_gets_one(tmp_path):
    rng = np.random.default_rng(1)
    relief = rng.integers(0, 256, (700, 1100, 3), dtype=np.uint8)
    Image.fromarray(relief).save(tmp_path / "relief.png")
    deepzoom.write_pyramid(tmp_path / "relief.png", tmp_path / "relief.tif")
    pyramid = deepzoom.open_pyramid(tmp_path / "relief.tif")
    assert pyramid.pages == ((1100, 700), (550, 350))
    np.testing.assert_array_equal(_assembled(pyramid, pyramid.max_level), relief)
    grey = tmp_path / "grey.tif"
    import tifffile

    tifffile.imwrite(grey, np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="not an RGB image pyramid"):
        deepzoom.open_pyramid(grey)
