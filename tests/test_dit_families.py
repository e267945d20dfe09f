"""What is particular to SD3/3.5, PixArt-Σ, Qwen-Image and SANA: their positions on a tiled canvas (SD3's table
crops, Qwen-Image's centred rotary frequencies) and true guidance's off switch. What every family keeps is
tests/test_families.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gigadiff.api import generate, generate_result, open_backend
from gigadiff.backends.flow import unpack
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
    """On a non-square canvas (512x256: 16 token rows, 32 columns) every tile's rotary frequencies are the crop, at
    its place, of those the model builds for the whole canvas, and the text's are the whole canvas's (after its
    largest index); tiles run one per call."""
    from gigadiff.grids import grid_plan

    backend = open_backend(str(tiny_qwen_image_dir), device="cpu")
    embed = backend.transformer.pos_embed
    seen = []
    hook = embed.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        result = generate_result(PROMPT, model=backend, size="512x256", steps=2, seed=1, tile=256, overlap=64,
                                 shift=False, positions="global", guidance=1.0, coherence="none")  # fmt: skip
    finally:
        hook.remove()
    tiles = grid_plan(result.settings, backend.info).grid(0).tiles
    assert len(tiles) == 3 and len(seen) == 2 * 3  # one call per tile and step
    whole = embed._compute_video_freqs(1, 16, 32).reshape(16, 32, -1)
    for (image, text), tile in zip(seen, [*tiles, *tiles], strict=True):
        top, left = tile.y // 2, tile.x // 2
        assert torch.allclose(image.reshape(16, 16, -1), whole[top : top + 16, left : left + 16])
        assert torch.equal(text, embed([(1, 16, 32)], max_txt_seq_len=text.shape[0])[1])


def test_qwen_image_global_positions_of_a_panorama_stay_clear_of_the_text(tiny_qwen_image_dir):
    """4096x1024 (64 rows, 256 columns of tokens): the right-hand tile's columns run up to 127, below the text's
    first position (128, after the canvas's largest centred index)."""
    from gigadiff.backends.qwen_image import centred_rope

    backend = open_backend(str(tiny_qwen_image_dir), device="cpu")
    cond = backend.condition(PROMPT, "", 1.0, (1024, 4096), {"positions": "global"})
    assert cond.canvas_tokens == (64, 256)
    embed = backend.transformer.pos_embed
    image, text = centred_rope(embed, cond.canvas_tokens, (48, 240), (16, 16), 4, "cpu")
    whole = embed._compute_video_freqs(1, 64, 256).reshape(64, 256, -1)
    assert torch.allclose(image.reshape(16, 16, -1), whole[48:64, 240:256])
    assert torch.equal(text, embed([(1, 64, 256)], max_txt_seq_len=4)[1])


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


FAMILIES = ["sd3", "pixart", "qwen-image", "sana"]


@pytest.fixture
def family_dir(request, tiny_sd3_dir, tiny_pixart_dir, tiny_qwen_image_dir, tiny_sana_dir):
    return {"sd3": tiny_sd3_dir, "pixart": tiny_pixart_dir, "qwen-image": tiny_qwen_image_dir,
            "sana": tiny_sana_dir}[request.param]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("family_dir", FAMILIES, indirect=True)
def test_a_progressive_run_keeps_its_stages_on_whole_tokens(family_dir):
    backend = open_backend(str(family_dir), device="cpu")
    if "sample_size" not in backend.transformer.config:  # Qwen-Image's config names no training size
        backend.info = replace(backend.info, native_size=256)
    channels = backend.info.latent_channels
    staged = generate_result(PROMPT, model=backend, size="1024x512", steps=2, seed=2, tile=256, overlap=64,
                             coherence="progressive")  # fmt: skip
    assert staged.latents.shape == (1, channels, 64, 128) and torch.isfinite(staged.latents).all()


def test_a_progressive_runs_dilated_views_are_positioned_as_whole_pictures(tiny_sd3_dir):
    """768x512 on SD3 (native 256 px) with --positions global: in the second stage (stride 2) each dilated view is
    the whole picture at 384x256, so its patch embedding adds the centred crop a whole image of that size gets
    (table rows 16..32, columns 12..36), not the crop of a block of the canvas; the local tiles get their places."""
    backend = open_backend(str(tiny_sd3_dir), device="cpu")
    embedding = backend.transformer.pos_embed
    table = embedding.pos_embed.reshape(48, 48, -1)
    crops = []

    def record(module, args, out):
        height, width = args[0].shape[-2:]
        crops.append(module.cropped_pos_embed(height, width).reshape(height // 2, width // 2, -1))

    hook = embedding.register_forward_hook(record)
    try:
        result = generate_result(PROMPT, model=backend, size="768x512", steps=2, seed=1, positions="global",
                                 coherence="progressive", guidance=0.0, shift=False)  # fmt: skip
    finally:
        hook.remove()
    assert result.settings.coherence == "progressive"
    views = [c for c in crops if c.shape[:2] == (16, 24)]
    assert len(views) >= 2  # the views of both steps (batched: a whole picture needs no call of its own)
    for crop in views:
        assert torch.equal(crop, table[16:32, 12:36])
    tiles = [c for c in crops[-4:] if c.shape[:2] == (16, 16)]  # the last step's local tiles: canvas places
    assert tiles and not any(torch.equal(c, table[16:32, 16:32]) for c in tiles[1:])


def test_each_progressive_stage_takes_its_timestep_shift_from_its_own_tiles(tiny_flux_dir):
    """FLUX.1 (mu from tokens) with 256-px tiles on 768x384, native size taken as 256: the first stage is 384x192,
    whose tiles are clamped to 192 rows (12 x 16 tokens), the second's full tiles (16 x 16 tokens)."""
    from gigadiff.shift import linear_mu

    backend = open_backend(str(tiny_flux_dir), device="cpu")
    backend.info = replace(backend.info, native_size=256)
    mus = []
    scheduler = backend.scheduler

    def recording(name, steps, sigmas, mu):
        mus.append(mu)
        return scheduler(name, steps, sigmas, mu)

    backend.scheduler = recording
    try:
        result = generate_result(PROMPT, model=backend, size="768x384", steps=2, seed=1, tile=256, overlap=64,
                                 coherence="progressive", guidance=3.5)  # fmt: skip
    finally:
        del backend.scheduler
    rule = backend.info.shift_rule
    assert mus == [pytest.approx(linear_mu(rule, 12 * 16)), pytest.approx(linear_mu(rule, 16 * 16))]
    assert result.settings.mu == pytest.approx(linear_mu(rule, 256))


def test_qwen_image_prompts_are_cut_and_guided_as_its_pipeline_does(tiny_qwen_image_dir):
    """A prompt of about 700 tokens is cut at 512 as QwenImagePipeline cuts it (its encode_prompt alone would keep
    1024); without a negative prompt true CFG is off (one pass), as the pipeline does, and the run says so."""
    from tests.helpers.families import CASES, pipeline_latents

    pipe = load(tiny_qwen_image_dir)
    long = "a red lighthouse on a cliff, " * 25
    got = generate_result(long, model=pipe, size="256x256", steps=2, seed=3, guidance=1.0)
    case = replace(CASES["qwen-image"], theirs={"true_cfg_scale": 1.0})
    base = pipe.scheduler
    theirs = pipeline_latents(pipe, case, "default", got.settings.mu, steps=2, prompt=long)
    pipe.scheduler = base
    assert (got.latents - unpack(theirs, 32, 32)).abs().max() <= 1e-4
    with pytest.warns(UserWarning, match="only with a negative prompt"):
        unguided = generate_result(PROMPT, model=pipe, size="256x256", steps=2, seed=3, guidance=4.0)
    assert unguided.run.model_calls == 2  # one pass per step
    assert unguided.metadata["notes"] and "give negative to use it" in unguided.metadata["notes"][0]
    plain = generate_result(PROMPT, model=pipe, size="256x256", steps=2, seed=3, guidance=1.0)
    assert torch.equal(unguided.latents, plain.latents)
