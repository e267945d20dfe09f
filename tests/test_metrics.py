"""The seam score flags a planted seam and passes a clean image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigadiff.geometry import tile_grid
from gigadiff.metrics import grid_anisotropy, grid_borders, seam_score


def test_clean_noise_scores_about_one_and_a_planted_step_is_flagged():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(256, 256))
    assert seam_score(image, [128], [64, 192]).ratio == pytest.approx(1.0, abs=0.15)
    seamed = image.copy()
    seamed[:, 64:] += 2.0  # a step along column 64
    assert seam_score(seamed, [], [64]).ratio == pytest.approx(3.0, rel=0.1)  # (2 + 2**2) / 2
    smooth = np.add.outer(np.arange(256.0), np.arange(256.0))  # a ramp: gradients equal everywhere
    assert seam_score(smooth, [100], [100]).ratio == pytest.approx(1.0)


def test_local_ratio_flags_creases_and_smoothed_bands_and_null_spread_reflects_the_image():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(256, 256))
    clean = seam_score(image, [64, 128, 192], [96, 160])
    assert clean.local == pytest.approx(1.0, abs=0.1) and clean.null_sd < 0.1
    assert abs(clean.ratio - 1) < 3 * clean.null_sd
    creased = image.copy()
    creased[:, 96:] += 1.5
    assert seam_score(creased, [], [96]).local > 1.5
    smoothed = image.copy()  # two unrelated textures averaged along the border: a band of low gradient
    smoothed[:, 92:100] = (image[:, 92:100] + rng.normal(size=(256, 8))) / 2
    assert seam_score(smoothed, [], [96]).local < 0.7
    rough = image * np.where(np.arange(256) < 32, 10.0, 1.0)[:, None]  # one rough band dominates the energy
    assert seam_score(rough, [64, 128, 192], [96, 160]).null_sd > 5 * clean.null_sd


def test_grid_borders_are_the_inner_tile_edges():
    grid = tile_grid(64, 256, 64, 8)
    rows, cols = grid_borders([grid], scale=8)
    assert rows == []
    assert cols == [v * 8 for v in sorted({48, 96, 144, 192, 64, 112, 160, 208})]


def test_needs_borders():
    with pytest.raises(ValueError, match="at least one border"):
        seam_score(np.zeros((8, 8)), [], [])


def photo(name: str = "astronaut") -> np.ndarray:
    from skimage import data

    return getattr(data, name)().astype(np.float64)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "rocket", "camera", "brick", "grass"])
def test_duplication_passes_real_photos(name):
    from gigadiff.metrics import duplication

    assert duplication(photo(name)).score < 0.5


def test_duplication_flags_a_subject_painted_twice_and_names_the_crops():
    from gigadiff.metrics import duplication

    image = photo()
    subject = image[150:250, 180:280].copy()  # the astronaut's face
    image[10:110, 10:110] = subject  # in crop (0, 0)
    image[140:240, 400:500] = subject  # in crop (1, 3), at another position inside its crop
    found = duplication(image, grid=4)
    assert found.score > 0.65 and found.pair == ((0, 0), (1, 3))
    assert duplication(np.tile(photo()[:256, :256], (2, 2, 1))).score == pytest.approx(1.0)


def test_edge_continuity_passes_a_periodic_image_and_flags_a_photo():
    from gigadiff.metrics import edge_continuity

    rng = np.random.default_rng(1)
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(96) * 96, np.fft.fftfreq(128) * 128))
    periodic = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(128, 96))) / (1 + frequency) ** 2))  # smooth
    score = edge_continuity(periodic)
    assert max(score.x, score.y) < 2  # one line against the mean of all: about 1, give or take line-to-line spread
    rolled = edge_continuity(np.roll(periodic, (40, 30), axis=(0, 1)))  # still periodic
    assert max(rolled.x, rolled.y) < 2
    cut = edge_continuity(periodic[:64, :48])  # a crop of the same texture does not continue across its edges
    assert min(cut.x, cut.y) > 10
    flagged = edge_continuity(photo())
    assert flagged.x > 10 and flagged.y > 10
    with pytest.raises(ValueError, match="at least 3x3"):
        edge_continuity(np.zeros((2, 9)))


def test_metrics_cli_reads_the_grid_from_a_gigadiff_output_and_writes_json(tiny_sd_dir, tmp_path):
    import json

    from tests.test_cli import invoke, tiny_args

    out = tmp_path / "house.png"
    assert invoke(*tiny_args(tiny_sd_dir, out)).exit_code == 0
    report_path = tmp_path / "report.json"
    result = invoke("metrics", str(out), "--json", str(report_path))
    assert result.exit_code == 0, result.output
    assert "tile borders from metadata" in result.output and "duplication:" in result.output
    assert "grid anisotropy:" in result.output
    report = json.loads(report_path.read_text())
    assert report["borders_from"] == "metadata" and (report["width"], report["height"]) == (768, 512)
    assert report["seams"]["ratio"] > 0 and -1 <= report["duplication"]["score"] <= 1
    assert report["grid"]["ratio"] > 0 and report["grid"]["null_sd"] > 0
    again = invoke("metrics", str(out), "--json", str(report_path))
    assert again.exit_code == 2 and "already exists" in again.output


def test_metrics_cli_flags_a_planted_seam_on_a_given_grid_and_reports_bad_files(tmp_path):
    from PIL import Image

    from tests.test_cli import invoke

    rng = np.random.default_rng(3)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(256, 256)), axis=0), axis=1)
    smooth = (smooth - smooth.min()) / np.ptp(smooth) * 200
    seamed = smooth.copy()
    seamed[:, 128:] += 40  # a tone step on the border of a 128-px grid
    for name, img in (("clean", smooth), ("seamed", seamed)):
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(tmp_path / f"{name}.png")
    clean = invoke("metrics", str(tmp_path / "clean.png"), "--tile", "128")
    flagged = invoke("metrics", str(tmp_path / "seamed.png"), "--tile", "128")
    score = {r: float(r.output.split("seam score: ")[1].split()[0]) for r in (clean, flagged)}
    assert score[clean] < 1.5 and score[flagged] > 10
    none = invoke("metrics", str(tmp_path / "clean.png"))
    assert none.exit_code == 0 and "no tile grid known" in none.output
    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken = invoke("metrics", str(tmp_path / "broken.png"))
    assert broken.exit_code == 2 and "cannot read image" in broken.output
    missing = invoke("metrics", str(tmp_path / "nope.png"))
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_metrics_cli_refuses_a_bad_grid_a_mismatched_sidecar_and_broken_metadata(tmp_path):
    from PIL import Image

    from tests.test_cli import invoke

    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48)).save(image)
    bad_grid = invoke("metrics", str(image), "--tile", "16", "--overlap", "16")
    assert bad_grid.exit_code == 2 and "overlap (16) must satisfy 0 <= overlap < tile (16)" in bad_grid.output
    sidecar = image.with_suffix(".json")
    sidecar.write_text('{"tile": 16, "overlap": 0, "width": 128, "height": 48, "seed": 1, "steps": 2}')
    mismatch = invoke("metrics", str(image))
    assert mismatch.exit_code == 2 and "is 64x48 but its metadata says 128x48" in mismatch.output
    sidecar.write_text("{broken")
    broken = invoke("metrics", str(image))
    assert broken.exit_code == 2 and "is not valid JSON" in broken.output


def _plateaus(levels: np.ndarray, starts: list[int], window: int, margin: int) -> np.ndarray:
    """Tiles of constant level fused as the terrain default does: linear cross-fades over the overlaps."""
    from gigadiff.fusion import fuse
    from gigadiff.geometry import Tile

    tiles = [Tile(y, x, window, window) for y in starts for x in starts]
    values = torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, window, window)
    size = starts[-1] + window
    return fuse(tiles, values.contiguous(), (1, 1, size, size), "linear", margin)[0, 0].numpy()


def test_grid_anisotropy_flags_tile_plateaus_and_passes_isotropic_relief():
    from gigadiff.levels import gaussian_lowpass

    rng = np.random.default_rng(2)
    texture = rng.normal(size=(512, 512)) * 0.05
    clean = grid_anisotropy(texture)
    assert abs(np.log(clean.ratio)) < 3 * clean.null_sd and clean.null_sd < 0.3
    noise = torch.from_numpy(rng.normal(size=(1, 1, 512, 512)))
    hills = gaussian_lowpass(noise, 12.0)[0, 0].numpy() * 10  # smooth relief, no preferred direction
    smooth = grid_anisotropy(hills + texture)
    assert abs(np.log(smooth.ratio)) < 3 * smooth.null_sd
    plateaus = _plateaus(rng.normal(size=25) * 0.3, [0, 96, 192, 288, 384], 128, 8)
    assert grid_anisotropy(plateaus + texture).ratio > 3


def test_coverage_counts_the_tiles_over_each_pixel_round_a_wrapped_ring():
    from gigadiff.geometry import Tile, TileGrid
    from gigadiff.metrics import coverage

    grid = TileGrid(4, 10, (Tile(0, 0, 4, 6), Tile(0, 4, 4, 6)))
    assert coverage(grid)[0].tolist() == [1, 1, 1, 1, 2, 2, 1, 1, 1, 1]
    ring = TileGrid(4, 10, (Tile(0, 0, 4, 6), Tile(0, 6, 4, 6)), (False, True))  # the second wraps to 0..1
    assert coverage(ring)[0].tolist() == [2, 2, 1, 1, 1, 1, 1, 1, 1, 1]


def test_band_texture_is_about_one_on_noise_and_low_where_two_unrelated_fields_are_averaged():
    from gigadiff.metrics import band_texture

    rng = np.random.default_rng(2)
    image, other = rng.normal(size=(2, 256, 256))
    band = np.zeros((256, 256), dtype=bool)
    band[:, 96:160] = True
    same = band_texture(image, band)
    assert same.gradient == pytest.approx(1.0, abs=0.05) and same.highpass == pytest.approx(1.0, abs=0.05)
    averaged = image.copy()
    averaged[band] = (image[band] + other[band]) / 2  # the mean of independent detail: half its energy
    smoothed = band_texture(averaged, band)
    assert smoothed.gradient == pytest.approx(0.5, abs=0.05) and smoothed.highpass == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="pixels under one tile and pixels under several"):
        band_texture(image, np.ones((256, 256), dtype=bool))


def test_line_contrast_finds_a_planted_line_and_passes_noise():
    from gigadiff.metrics import line_contrast

    rng = np.random.default_rng(3)
    image = rng.normal(size=(512, 512))
    assert line_contrast(image).ratio < 1.15
    lined = image.copy()
    lined[:, 200:] += 1.5  # a cliff between columns 199 and 200
    found = line_contrast(lined)
    assert (found.axis, found.at) == ("column", 200) and found.ratio > 1.3  # noise alone: 1.15 at most
    lined = image.copy()
    lined[300:, :] += 1.5
    assert (line_contrast(lined).axis, line_contrast(lined).at) == ("row", 300)
