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
