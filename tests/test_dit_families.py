"""SD3/3.5, PixArt-Σ, Qwen-Image and SANA: equal to their diffusers pipelines on one tile, tiled with their
guidance and positions done right, and their refusals before any weights load."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from gigadiff.api import generate, generate_result, open_backend
from gigadiff.backends.flow import unpack
from gigadiff.cli import app
from gigadiff.schedulers import make_scheduler
from tests.conftest import load

PROMPT = "a red lighthouse"


def reference(pipe, kind: str, scheduler: str, steps: int = 3, mu: float | None = None, **kw):
    """diffusers' own pipeline, its scheduler swapped for gigadiff's `scheduler` (configured as gigadiff does)."""
    base = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler, base, kind, mu)
    try:
        return pipe(prompt=PROMPT, height=256, width=256, num_inference_steps=steps, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(3), **kw).images  # fmt: skip
    finally:
        pipe.scheduler = base


def ours(pipe, scheduler: str, steps: int = 3, **kw):
    return generate_result(PROMPT, model=pipe, size="256x256", steps=steps, seed=3, scheduler=scheduler, **kw)


@pytest.mark.parametrize("scheduler", ["default", "dpmpp_2m"])
def test_sd3_matches_its_pipeline_on_one_tile(tiny_sd3_dir, scheduler):
    pipe = load(tiny_sd3_dir)
    got = ours(pipe, scheduler, guidance=5.0, negative="fog")
    ref = reference(pipe, "flow", scheduler, guidance_scale=5.0, negative_prompt="fog")
    assert got.latents.shape == (1, 16, 32, 32) and got.settings.mu is None  # the model's fixed shift
    assert (got.latents - ref).abs().max() <= 1e-4
    turbo = ours(pipe, scheduler, guidance=0.0)  # no guidance: one pass, as SD3.5 Large Turbo runs
    ref = reference(pipe, "flow", scheduler, guidance_scale=0.0)
    assert (turbo.latents - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("scheduler", ["default", "ddim"])
def test_pixart_sigma_matches_its_pipeline_on_one_tile(tiny_pixart_dir, scheduler):
    """Resolution binning off (a tile is the size it asks for); captions not cleaned, as gigadiff encodes them.
    The random tiny DiT's x0 estimates reach hundreds at high noise: equality is up to float32 rounding of those."""
    pipe = load(tiny_pixart_dir)
    got = ours(pipe, scheduler, guidance=4.5, negative="fog")
    ref = reference(pipe, "ddpm", scheduler, guidance_scale=4.5, negative_prompt="fog", use_resolution_binning=False,
                    clean_caption=False)  # fmt: skip
    assert got.latents.shape == (1, 4, 32, 32)
    assert (got.latents - ref).abs().max() <= max(1e-4, 1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("scheduler", ["default", "unipc"])
def test_qwen_image_matches_its_pipeline_on_one_tile(tiny_qwen_image_dir, scheduler):
    """True guidance with its per-token rescale, mu from the tile (its dynamic shift), packed noise; global
    positions on a canvas that is one tile are the model's own."""
    pipe = load(tiny_qwen_image_dir)
    got = ours(pipe, scheduler, guidance=4.0, negative="fog")
    ref = unpack(reference(pipe, "flow", scheduler, mu=got.settings.mu, true_cfg_scale=4.0, negative_prompt="fog"),
                 32, 32)  # fmt: skip
    assert got.latents.shape == (1, 4, 32, 32) and got.settings.mu == pytest.approx(0.5)  # 256 tokens: base shift
    assert (got.latents - ref).abs().max() <= 1e-4
    centred = ours(pipe, scheduler, guidance=4.0, negative="fog", positions="global")
    assert (centred.latents - ref).abs().max() <= 1e-4
    plain = ours(pipe, scheduler, guidance=1.0)  # no guidance: one pass, as true_cfg_scale 1
    ref = unpack(reference(pipe, "flow", scheduler, mu=got.settings.mu, true_cfg_scale=1.0), 32, 32)
    assert (plain.latents - ref).abs().max() <= 1e-4


def test_qwen_image_global_positions_are_the_canvas_centred_ones(tiny_qwen_image_dir):
    """A tile's rotary frequencies are the crop, at its place, of those the model builds for the whole canvas;
    the text's follow the canvas's largest index. Tiles then run one per call."""
    from gigadiff.backends.qwen_image import centred_rope

    backend = open_backend(str(tiny_qwen_image_dir), device="cpu")
    embed = backend.transformer.pos_embed
    canvas = embed._compute_video_freqs(1, 24, 40).reshape(24, 40, -1)
    image, text = centred_rope(embed, (24, 40), (8, 16), (12, 16), 5, "cpu")
    assert torch.equal(image.reshape(12, 16, -1), canvas[8:20, 16:32])
    assert torch.equal(text, embed.pos_freqs[20:25])
    calls = []
    hook = backend.transformer.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        result = generate_result(PROMPT, model=backend, size="512x256", steps=2, seed=1, tile=256, overlap=64,
                                 positions="global", guidance=1.0, coherence="none")  # fmt: skip
    finally:
        hook.remove()
    assert result.run.tiles_per_step == 3 and len(calls) == 6 and torch.isfinite(result.latents).all()


@pytest.mark.parametrize("scheduler", ["default", "euler"])
def test_sana_matches_its_pipeline_on_one_tile(tiny_sana_dir, scheduler):
    """Its DPM-Solver with flow sigmas and fixed shift, the instruction prefix of its pipeline, binning off."""
    pipe = load(tiny_sana_dir)
    got = ours(pipe, scheduler, guidance=4.5, negative="fog")
    ref = reference(pipe, "flow", scheduler, guidance_scale=4.5, negative_prompt="fog", use_resolution_binning=False)
    assert got.latents.shape == (1, 4, 32, 32) and got.settings.mu is None
    assert (got.latents - ref).abs().max() <= 1e-4


def test_sd3_global_positions_crop_the_table_at_each_tile(tiny_sd3_dir):
    """The canvas is centred on the 48-patch position table; each tile's patch embedding adds the table's crop at
    the tile's place on it (one tile per call); local positions add the centred crop every time."""
    backend = open_backend(str(tiny_sd3_dir), device="cpu")
    embedding = backend.transformer.pos_embed
    table = embedding.pos_embed.reshape(48, 48, -1)
    crops = []

    def record(module, args, out):
        height, width = args[0].shape[-2:]
        crops.append(module.cropped_pos_embed(height, width).reshape(height // 2, width // 2, -1))

    hook = embedding.register_forward_hook(record)
    try:
        result = generate_result(PROMPT, model=backend, size="512x256", steps=1, seed=1, tile=256, overlap=64,
                                 shift=False, positions="global", guidance=0.0, coherence="none")  # fmt: skip
        assert result.run.tiles_per_step == 3 and len(crops) == 3  # one transformer call per tile
        # canvas 16 x 32 patches on the table: top (48 - 16) / 2 = 16, left (48 - 32) / 2 = 8; tiles at x 0, 8, 16
        for crop, left in zip(crops, (8, 16, 24), strict=True):
            assert torch.equal(crop, table[16:32, left : left + 16])
        crops.clear()
        generate_result(PROMPT, model=backend, size="512x256", steps=1, seed=1, tile=256, overlap=64, shift=False,
                        guidance=0.0, coherence="none")  # fmt: skip
        assert len(crops) == 1 and torch.equal(crops[0], table[16:32, 16:32])  # centred, both tiles in one call
    finally:
        hook.remove()
    assert "cropped_pos_embed" not in vars(embedding)  # the patch embedding is restored
    one = generate(PROMPT, model=backend, size="256x256", steps=2, seed=1, guidance=0.0, output_type="latent")
    same = generate(PROMPT, model=backend, size="256x256", steps=2, seed=1, guidance=0.0, positions="global",
                    output_type="latent")  # fmt: skip
    assert torch.equal(one, same)  # a canvas of one tile: the centred crop either way


def test_refusals_come_before_any_weights(tiny_sd3_dir, tiny_pixart_dir, tiny_qwen_image_dir, tiny_sana_dir,
                                          tmp_path):  # fmt: skip
    runner = CliRunner()
    cases = [
        (tiny_sd3_dir, ["--size", "1024x256", "--positions", "global"],
         "tiny-sd3''s position table covers 768px a side, the canvas is 1024x256; use --positions local"),
        (tiny_sd3_dir, ["--size", "264x256"], "--size: width 264 is not a multiple of 16"),
        (tiny_pixart_dir, ["--positions", "global"], "--positions"),
        (tiny_pixart_dir, ["--true-cfg", "2"], "--true-cfg"),
        (tiny_qwen_image_dir, ["--size", "520x256"], "--size: width 520 is not a multiple of 16"),
        (tiny_qwen_image_dir, ["--true-cfg", "4"], "its guidance is classifier-free already: use --guidance"),
        (tiny_qwen_image_dir, ["--steps", "1"], "tiny-qwen-image' needs at least 2 steps"),
        (tiny_sana_dir, ["--size", "260x256"], "--size: width 260 is not a multiple of 8"),
        (tiny_sana_dir, ["--positions", "global"], "--positions"),
        (tiny_sana_dir, ["--scheduler", "ddim"], "ddim"),
    ]  # fmt: skip
    for model, extra, words in cases:
        result = runner.invoke(app, ["generate", PROMPT, "--model", str(model), "-o", str(tmp_path / "x.png"),
                                     *extra])  # fmt: skip
        assert result.exit_code == 2, (extra, result.output)
        assert words in result.output, (extra, result.output)
    assert not (tmp_path / "x.png").exists()


FAMILIES = ["sd3", "pixart", "qwen-image", "sana"]


@pytest.fixture
def family_dir(request, tiny_sd3_dir, tiny_pixart_dir, tiny_qwen_image_dir, tiny_sana_dir):
    return {"sd3": tiny_sd3_dir, "pixart": tiny_pixart_dir, "qwen-image": tiny_qwen_image_dir,
            "sana": tiny_sana_dir}[request.param]  # fmt: skip


@pytest.mark.parametrize("family_dir", FAMILIES, indirect=True)
def test_tiled_runs_do_not_depend_on_the_tile_batch(family_dir):
    backend = open_backend(str(family_dir), device="cpu")
    runs = [generate(PROMPT, model=backend, size="768x512", steps=2, seed=4, tile=256, overlap=64, tile_batch=n,
                     negative="fog", output_type="latent") for n in (1, 3)]  # fmt: skip
    assert torch.isfinite(runs[0]).all()
    assert (runs[1] - runs[0]).abs().max() <= 1e-5 * runs[0].abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("family_dir", FAMILIES, indirect=True)
def test_img2img_regions_tileable_and_progressive_run(family_dir, tmp_path):
    from PIL import Image

    backend = open_backend(str(family_dir), device="cpu")
    if "sample_size" not in backend.transformer.config:  # Qwen-Image's config names no training size
        backend.info = replace(backend.info, native_size=256)
    channels = backend.info.latent_channels
    photo = tmp_path / "p.png"
    Image.effect_noise((512, 256), 40).convert("RGB").save(photo)
    img2img = generate_result(PROMPT, model=backend, init=str(photo), strength=0.5, steps=4, seed=2, tile=256,
                              overlap=64)  # fmt: skip
    assert img2img.run.steps.first == 2 and img2img.latents.shape == (1, channels, 32, 64)
    regional = generate_result(PROMPT, model=backend, size="512x256", steps=2, seed=2, tile=256, overlap=64,
                               regions={"regions": [{"box": [0, 0, 0.5, 1], "prompt": "a barn"}]})  # fmt: skip
    assert torch.isfinite(regional.latents).all()
    ring = generate_result(PROMPT, model=backend, size="512x256", steps=2, seed=2, tile=256, overlap=64,
                           tileable="x")  # fmt: skip
    assert ring.settings.wrap == (False, True)
    staged = generate_result(PROMPT, model=backend, size="1024x512", steps=2, seed=2, tile=256, overlap=64,
                             coherence="progressive")  # fmt: skip
    assert staged.latents.shape == (1, channels, 64, 128) and torch.isfinite(staged.latents).all()


@pytest.mark.parametrize("family_dir", FAMILIES, indirect=True)
def test_an_interrupted_run_resumes_to_the_same_latents(family_dir, tmp_path):
    from gigadiff.api import resume_result
    from gigadiff.checkpoint import load_checkpoint
    from tests.test_checkpoint import interrupted

    backend = open_backend(str(family_dir), device="cpu")
    fields = {"prompt": PROMPT, "size": "512x256", "steps": 4, "seed": 2, "tile": 256, "overlap": 64,
              "negative": "fog"}  # fmt: skip
    full = generate_result(model=backend, **fields).latents
    path = tmp_path / "run.ckpt.safetensors"
    interrupted(backend, path, **fields)
    assert load_checkpoint(path).step == 2
    assert torch.equal(resume_result(path, model=backend).latents, full)


@pytest.mark.slow
@pytest.mark.parametrize("family_dir", ["qwen-image", "sana"], indirect=True)
def test_torchrun_world_sizes_give_the_same_latents(family_dir, tmp_path):
    from gigadiff.io.writers import read_latent
    from tests.test_distributed import gen_args, torchrun

    latents = []
    for n in (1, 2):
        out = tmp_path / f"w{n}.png"
        args = [a if a != "dpmpp_2m" else "default" for a in gen_args(family_dir, out)]
        proc = torchrun(n, args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        latents.append(read_latent(out.with_suffix(".safetensors"))[0])
    assert torch.equal(latents[0], latents[1])
