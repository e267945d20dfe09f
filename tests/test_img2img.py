"""img2img and upscaling: a one-tile canvas reproduces diffusers' img2img pipeline; strength, sizes and errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from gigadiff.api import generate
from gigadiff.schedulers import make_scheduler
from gigadiff.vae.tiling import VaeTiling


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)  # 512 x 512
    return path


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_one_tile_img2img_matches_the_diffusers_img2img_pipeline(sd_pipe, photo_file, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(scheduler, sd_pipe.scheduler)
    with Image.open(photo_file) as im:
        ref = pipe("an astronaut", image=im.convert("RGB"), strength=0.6, num_inference_steps=5, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(4), output_type="latent").images  # fmt: skip
    got = generate("an astronaut", model=sd_pipe, steps=5, guidance=7.5, seed=4, scheduler=scheduler,
                   init=str(photo_file), strength=0.6, output_type="latent")  # fmt: skip
    assert got.shape == ref.shape == (1, 4, 64, 64)
    assert (got - ref).abs().max().item() <= 1e-3  # the tiled encode equals the whole encode within 1e-4


def test_strength_sets_how_far_the_result_moves_from_the_image(sd_backend, photo_file):
    from gigadiff.io.images import load_resized

    init = sd_backend.codec.encode(load_resized(photo_file, 768, 512), None, VaeTiling())
    distance = []
    for strength in (0.2, 0.5, 1.0):
        got = generate("an astronaut", model=sd_backend, size="768x512", steps=10, seed=1, tile=256, overlap=64,
                       init=str(photo_file), strength=strength, output_type="latent")  # fmt: skip
        distance.append((got - init).pow(2).mean().item())
    assert distance[0] < distance[1] < distance[2]


def test_upscale_cli_enlarges_records_and_runs_only_strength_of_the_steps(tiny_sd_dir, photo_file, tmp_path):
    from gigadiff.io.writers import read_png_metadata
    from tests.test_cli import invoke

    small = tmp_path / "small.png"
    with Image.open(photo_file) as im:
        im.resize((200, 136)).save(small)
    result = invoke("upscale", str(small), "--model", str(tiny_sd_dir), "--scale", "3", "--strength", "0.5",
                    "--steps", "4", "--seed", "2", "--tile", "256", "--overlap", "64", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "small_x3.png"
    with Image.open(out) as im:
        assert im.size == (600, 408)  # 3 x (200, 136), rounded to multiples of 8
    meta = read_png_metadata(out)
    assert meta["init"] == str(small) and meta["strength"] == 0.5 and meta["steps"] == 4
    assert "6 tiles/step, 4 model calls" in result.output  # 2 of 4 steps x 6 tiles, 4 tiles per call


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strength", "0.5"], "--strength applies to an init image"),
        (["--init", "{missing}"], "does not exist"),
        (["--init", "{broken}"], "cannot read init image"),
        (["--init", "{photo}", "--strength", "0"], "strength must lie in (0, 1]"),
        (["--init", "{photo}", "--strength", "0.1", "--steps", "4"], "leaves no step to run"),
    ],
)
def test_init_image_errors_come_before_any_compute(tiny_sd_dir, photo_file, tmp_path, args, message):
    from tests.test_cli import invoke, tiny_args

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no image here")
    paths = {"missing": str(tmp_path / "missing.png"), "broken": str(broken), "photo": str(photo_file)}
    args = [a.format(**paths) for a in args]
    out = tmp_path / "out.png"
    base = [a for a in tiny_args(tiny_sd_dir, out) if a not in ("--steps", "2")]
    result = invoke(*base, *args)
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()


def test_terrain_refuses_an_init_image(photo_file):
    from gigadiff.errors import GigadiffError

    with pytest.raises(GigadiffError, match="cannot encode images"):
        generate(model="terrain", size="256x256", steps=1, init=str(photo_file))


def test_upscale_refuses_a_scale_that_is_not_positive(tiny_sd_dir, photo_file, tmp_path):
    from tests.test_cli import invoke

    result = invoke("upscale", str(photo_file), "--model", str(tiny_sd_dir), "--scale", "0", "-o",
                    str(tmp_path / "x.png"))  # fmt: skip
    assert result.exit_code == 2 and "scale must be positive, got 0" in result.output
    assert not (tmp_path / "x.png").exists()


def test_a_flow_models_upscale_starts_where_its_img2img_pipeline_starts(tiny_flux_dir, tmp_path):
    """`gigadiff upscale` on FLUX.1: the image enlarged (Lanczos), encoded, noised to the step FluxImg2ImgPipeline's
    strength rule starts at (4 steps at 0.6: 3 run, where the DDPM rule would run 2), equal to the pipeline."""
    from diffusers import FluxImg2ImgPipeline

    from gigadiff.backends.flow import unpack
    from gigadiff.io.writers import read_latent
    from tests.conftest import load
    from tests.test_cli import invoke

    small = tmp_path / "small.png"
    Image.effect_noise((128, 128), 60).convert("RGB").save(small)
    latent = tmp_path / "up.safetensors"
    result = invoke("upscale", str(small), "--model", str(tiny_flux_dir), "--scale", "2", "--strength", "0.6",
                    "--steps", "4", "--seed", "3", "--guidance", "3.5", "--save-latent", str(latent), "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    ours, meta = read_latent(latent)
    assert meta["timesteps"]["first"] == 1
    pipe = FluxImg2ImgPipeline.from_pipe(load(tiny_flux_dir))
    pipe.set_progress_bar_config(disable=True)
    with Image.open(small) as im:
        image = im.convert("RGB").resize((256, 256), Image.Resampling.LANCZOS)
    theirs = pipe("", image=image, strength=0.6, num_inference_steps=4, guidance_scale=3.5, height=256, width=256,
                  generator=torch.Generator().manual_seed(3), output_type="latent").images  # fmt: skip
    assert (ours - unpack(theirs, 32, 32)).abs().max() <= 1e-3 * max(1.0, float(theirs.abs().max()))
