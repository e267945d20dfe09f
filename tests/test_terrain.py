"""The real pretrained terrain model (ONNX, from adaptive-terrain-diffusion) run by gigadiff's own loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("terrain_diffusion", reason="install with: pip install --no-deps adaptive-terrain-diffusion")

from gigadiff.api import generate_result, open_backend
from gigadiff.backends.terrain import HEIGHT_RANGE_M, difficulty_label, model_to_heights
from gigadiff.cli import app
from gigadiff.errors import GigadiffError
from gigadiff.io.heightmap import read_heightmap
from gigadiff.noise import canvas_noise, seeded_generator
from gigadiff.options import RunRequest
from gigadiff.runs.checks import settings_for
from gigadiff.vae.tiling import VaeTiling

runner = CliRunner()


@pytest.fixture(scope="module")
def terrain():
    return open_backend("terrain", "cpu")


def run(terrain, width=256, height=256, **fields):
    """The terrain model's run of `fields` (width and height as its --size)."""
    return generate_result(model=terrain, **{"size": f"{width}x{height}", "seed": 4, "difficulty": 60, **fields})


def test_one_step_is_the_network_on_seeded_noise_with_the_border_padded(terrain):
    """A 128² map is made on a 256² canvas (padded by the 64-px overlap on every side, so that its border is
    covered like its middle): nine 128² windows of the seeded noise, fused with their rims damped, then cropped."""
    from gigadiff.fusion import fuse
    from gigadiff.geometry import Tile

    result = run(terrain, width=128, height=128, steps=1, weights="uniform", level_sync=False, shift=False)
    assert result.run.tiles_per_step == 9
    noise = canvas_noise((1, 1, 256, 256), seeded_generator(4)) * 80.0
    cond = terrain.condition("", "", None, (128, 128), {"difficulty": 60})
    tiles = [Tile(y, x, 128, 128) for y in (0, 64, 128) for x in (0, 64, 128)]
    crops = torch.cat([noise[..., t.y : t.y + 128, t.x : t.x + 128] for t in tiles])
    fused = fuse(tiles, terrain.predict(crops, torch.tensor(80.0), cond, tiles), (1, 1, 256, 256), "uniform", 8)
    assert result.latents.shape == (1, 1, 128, 128)
    assert torch.allclose(result.latents, fused[..., 64:192, 64:192], rtol=1e-6, atol=1e-6)


def _bands(heights: np.ndarray, width: int = 8, rings: int = 8) -> tuple[float, np.ndarray]:
    """Mean squared gradient in the outer `width` px of a map, and in each ring of that width further in."""
    gy, gx = np.gradient(heights.astype(np.float64))
    energy = gy**2 + gx**2
    h, w = heights.shape
    distance = np.minimum(np.minimum.outer(np.minimum(np.arange(h), np.arange(h)[::-1]),
                                           np.minimum(np.arange(w), np.arange(w)[::-1])), 10**6)  # fmt: skip
    values = [float(energy[(distance >= k * width) & (distance < (k + 1) * width)].mean()) for k in range(rings + 1)]
    return values[0], np.array(values[1:])


def test_the_border_is_painted_like_the_interior(terrain):
    """The model's rim (gradient energy 1.5-3x the interior within ~6 px of a tile's edge) must not reach the map
    border, and the border band must be averaged like the interior: its texture energy lies within the spread of
    the rings inside, and no pixel sits at the network's clamps (its graph clamps x0 to [-1, 1])."""
    for seed in (1, 2):
        latents = run(terrain, width=384, height=384, seed=seed).latents
        assert latents.min() > -1 and latents.max() < 1, "pixels at the network's clamp"
        border, inner = _bands(latents[0, 0].numpy())
        assert inner.min() * 0.8 <= border <= inner.max() * 1.25, (seed, border, inner)


def test_without_the_padding_the_border_would_show_the_rim(terrain, monkeypatch):
    """The measure above fails when the canvas is not padded: the rim's texture reaches the border."""
    import gigadiff.recipes.txt2img as txt2img

    monkeypatch.setattr(txt2img, "border_pad", lambda settings, info: (0, 0))
    latents = run(terrain, width=384, height=384, seed=1).latents
    border, inner = _bands(latents[0, 0].numpy())
    assert border > inner.max() * 1.25, (border, inner)


def test_deterministic_for_a_seed_and_different_across_seeds(terrain):
    small = {"steps": 2, "width": 192, "height": 128}  # two steps: the re-noising draws from the seed too
    a = run(terrain, **small).latents
    b = run(terrain, **small).latents
    c = run(terrain, **small, seed=5).latents
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05


def test_multistep_run_is_a_plausible_heightmap(terrain):
    result = run(terrain, steps=2, tile_batch=3)
    assert result.settings.overlap == 64  # the terrain default: half a tile
    assert result.run.tiles_per_step == 25  # 256 px padded by 64 on each side, 128 tiles, 64 overlap -> 5 x 5
    # 2 steps, 25 tiles in batches of 3, and level consensus's 4 probe tiles in batches of 3
    assert result.run.model_calls == 2 * (9 + 2)
    assert result.latents.min() >= -1 and result.latents.max() <= 1  # the model's own range
    heights = terrain.codec.decode(result.latents, VaeTiling())
    assert heights.shape == (1, 1, 256, 256)
    assert heights.min() >= 0 and heights.max() <= HEIGHT_RANGE_M
    assert heights.std() > 0.01  # not flat
    # the map is smooth at the pixel scale: neighbour differences far below the height range
    assert (heights[..., 1:] - heights[..., :-1]).abs().mean() < 0.05 * HEIGHT_RANGE_M


def test_defaults_are_wide_cross_fades_and_one_step(terrain):
    """Half-tile overlaps (32 px ones leave straight cliffs), one step as the network was distilled for (more add
    relief), tent weights, level consensus."""
    s = settings_for(RunRequest(model="terrain", difficulty=60), terrain.info)[1]
    assert (s.width, s.tile, s.overlap, s.steps, s.weights, s.level_sync) == (1024, 128, 64, 1, "linear", True)


def test_difficulty_conditions_the_model(terrain):
    gentle = run(terrain, steps=1, difficulty=1).latents
    rugged = run(terrain, steps=1, difficulty=100).latents
    assert not torch.equal(gentle, rugged)


def test_difficulty_label_and_height_transform():
    assert difficulty_label(1) == 0.0 and difficulty_label(100) == 1.0
    for bad in (0, 101, float("nan")):
        with pytest.raises(GigadiffError, match="difficulty must be a number from 1 to 100"):
            difficulty_label(bad)
    heights = model_to_heights(torch.tensor([-1.0, 0.0, 1.0]))
    assert heights[0] == 0 and abs(float(heights[2]) - HEIGHT_RANGE_M) < 1e-4
    assert 0 < heights[1] < 0.1 * HEIGHT_RANGE_M  # asinh companding: the midpoint is a low height (1.05 m)


def test_cli_writes_16bit_heightmap_relief_and_sidecar(tmp_path):
    out = tmp_path / "terrain.png"
    result = runner.invoke(app, ["generate", "--model", "terrain", "--size", "256x256", "--difficulty", "70",
                                 "--seed", "9", "-o", str(out), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    heights, meta = read_heightmap(out)
    assert heights.shape == (256, 256)
    assert meta["difficulty"] == 70 and meta["model"] == "terrain" and meta["height_unit"] == "m"
    assert meta["height_min_m"] == pytest.approx(float(heights.min()), abs=1e-6)
    assert meta["height_max_m"] == pytest.approx(float(heights.max()), abs=1e-4)
    from PIL import Image

    with Image.open(out) as im:
        assert im.mode == "I;16"
    with Image.open(tmp_path / "terrain.relief.png") as im:
        assert im.mode == "RGB" and im.size == (256, 256)
    assert (tmp_path / "terrain.json").is_file()
    # the same run as a float TIFF holds the exact heights the PNG quantised
    tif = tmp_path / "exact.tif"
    assert runner.invoke(app, ["generate", "--model", "terrain", "--size", "256x256", "--difficulty", "70",
                               "--seed", "9", "-o", str(tif), "-q"]).exit_code == 0  # fmt: skip
    exact, tif_meta = read_heightmap(tif)
    assert exact.dtype == np.float32 and tif_meta["seed"] == 9
    step = (meta["height_max_m"] - meta["height_min_m"]) / 65535
    assert np.abs(exact - heights).max() <= step


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--difficulty", "0"], "--difficulty must lie in [1, 100], got 0"),
        (["--difficulty", "101"], "--difficulty must lie in [1, 100], got 101"),
        (["mountains"], "model 'terrain' takes no prompt: remove PROMPT"),
        (["--negative", "flat"], "model 'terrain' takes no prompt: remove --negative"),
        (["--guidance", "3"], "takes no guidance scale; remove --guidance"),
        (["--scheduler", "ddim"], "has its own sampler"),
        (["--size", "100x100"], "smaller than model 'terrain''s 128x128 input"),
        (["--tile", "256"], "only takes 128x128 tiles"),
        (["--overlap", "8"], "--overlap (8px) must be at least 16px"),
        (["--dtype", "bf16"], "model 'terrain' runs in fp32 only"),
        (["--sigmas", "20,80"], "sigmas must be positive and decreasing"),
    ],
)
def test_cli_errors(tmp_path, extra, message):
    args = ["generate", "--model", "terrain", "--size", "256x256", "-o", str(tmp_path / "t.png"), "-q", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "t.png").exists()


def test_upscaling_with_terrain_names_the_reason_it_cannot(tmp_path):
    Image.new("RGB", (128, 128)).save(tmp_path / "in.png")
    for extra in ([], ["--prompt", ""]):
        result = runner.invoke(app, ["upscale", str(tmp_path / "in.png"), "--model", "terrain", *extra])
        assert result.exit_code == 2
        assert result.output.strip() == ("error: model 'terrain' cannot encode images, so it cannot upscale or start "
                                         "from an image (IMAGE)")  # fmt: skip


def test_difficulty_is_refused_for_other_models(tiny_sd_dir, tmp_path):
    args = ["generate", "x", "--model", str(tiny_sd_dir), "--difficulty", "5", "-o", str(tmp_path / "o.png"), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "does not accept difficulty" in result.output


def test_python_api_takes_backend_options_and_returns_the_relief(terrain):
    from gigadiff import generate

    image = generate(model=terrain, size="256x128", steps=1, seed=2, difficulty=30)
    assert image.mode == "RGB" and image.size == (256, 128)
    latent = generate(model=terrain, size=(128, 128), sigmas="80,10", seed=2, difficulty=30, output_type="latent")
    assert latent.shape == (1, 1, 128, 128)
    with pytest.raises(GigadiffError, match=r"unknown option\(s\) colour"):
        generate(model=terrain, size="128x128", colour="red")
