"""What is particular to the flow-matching DiT families (FLUX.1, FLUX.2, FLUX.2 klein, Z-Image): true guidance and
schnell's defaults, the timestep shift of a tiled canvas, position ids, FLUX.2's latent statistics, their VAEs. What
every family keeps (equality with its pipeline, batch and world-size identity, ...) is tests/test_families.py."""

from __future__ import annotations

import pytest
import torch

from gigadiff.api import generate, generate_result, open_backend
from gigadiff.backends.flow import unpack
from gigadiff.schedulers import make_scheduler
from tests.conftest import load

PROMPT = "a red lighthouse"


def reference(pipe, scheduler: str, mu: float | None, steps: int = 3, size: int = 256, **kw):
    """diffusers' own pipeline, its scheduler swapped for gigadiff's `scheduler` (configured as gigadiff does)."""
    base = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler, base, "flow", mu)
    try:
        return pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(3), **kw).images  # fmt: skip
    finally:
        pipe.scheduler = base


def ours(pipe, scheduler: str, steps: int = 3, size: int = 256, **kw):
    return generate_result(PROMPT, model=pipe, size=f"{size}x{size}", steps=steps, seed=3, scheduler=scheduler, **kw)


def test_flux_true_cfg_and_schnell_match_flux_pipeline(flux_pipe, tiny_flux_schnell_dir):
    got = ours(flux_pipe, "default", guidance=3.5, true_cfg=2.5, negative="fog")
    ref = reference(flux_pipe, "default", None, guidance_scale=3.5, true_cfg_scale=2.5, negative_prompt="fog")
    assert (got.latents - unpack(ref, 32, 32)).abs().max() <= 1e-4
    with pytest.warns(UserWarning, match="true_cfg 2.5"):  # no negative prompt: the pipeline turns true CFG off
        alone = ours(flux_pipe, "default", guidance=3.5, true_cfg=2.5)
    ref = reference(flux_pipe, "default", None, guidance_scale=3.5, true_cfg_scale=2.5)
    assert (alone.latents - unpack(ref, 32, 32)).abs().max() <= 1e-4 and alone.run.model_calls == 3
    schnell = load(tiny_flux_schnell_dir)
    got = generate_result(PROMPT, model=schnell, size="256x256", seed=3)  # schnell's defaults: 4 steps, no guidance
    assert (got.settings.steps, got.settings.guidance, got.settings.mu) == (4, None, None)
    ref = reference(schnell, "default", None, steps=4)
    assert (got.latents - unpack(ref, 32, 32)).abs().max() <= 1e-4


def test_flux2_codec_applies_the_vaes_batchnorm_statistics_as_the_pipeline_does(tiny_klein_dir):
    """Canvas -> VAE latents and back (x std + mean, unpatchify) is exact, and not the identity."""
    backend = open_backend(str(tiny_klein_dir), device="cpu")
    canvas = torch.randn(1, 32, 6, 8, generator=torch.Generator().manual_seed(0))
    raw = backend.codec.to_vae(canvas)
    assert raw.shape == (1, 8, 12, 16) and not torch.allclose(raw[:, :, ::2, ::2], canvas[:, :8])
    assert torch.allclose(backend.codec.from_vae(raw), canvas, atol=1e-6)


def calls_of(backend, what: str):
    """Record one keyword argument of every transformer call."""
    seen = []
    transformer = backend.denoiser
    original = transformer.forward

    def spy(*args, **kwargs):
        seen.append(kwargs[what].clone() if torch.is_tensor(kwargs.get(what)) else kwargs.get(what))
        return original(*args, **kwargs)

    transformer.forward = spy
    return seen, lambda: delattr(transformer, "forward")


def test_the_timestep_shift_of_a_large_canvas_is_the_tiles(flux_backend):
    """mu from one tile's tokens: a 512x1024 canvas of 256-px tiles steps through the timesteps of a 256-px image."""
    timesteps, restore = calls_of(flux_backend, "timestep")
    try:
        big = generate_result(PROMPT, model=flux_backend, size="1024x512", steps=3, seed=1, tile=256, overlap=64,
                              coherence="none")  # fmt: skip
        big_steps = sorted({round(float(t[0]), 6) for t in timesteps}, reverse=True)
        timesteps.clear()
        generate_result(PROMPT, model=flux_backend, size="256x256", steps=3, seed=1)
        tile_steps = sorted({round(float(t[0]), 6) for t in timesteps}, reverse=True)
    finally:
        restore()
    assert big.settings.mu == pytest.approx(0.5) and big.metadata["mu"] == pytest.approx(0.5)
    assert big_steps == tile_steps
    canvas = generate_result(PROMPT, model=flux_backend, size="1024x512", steps=3, seed=1, tile=256, overlap=64,
                             coherence="none", flow_shift="canvas")  # fmt: skip
    assert canvas.settings.mu == pytest.approx(0.5 + (2048 - 256) * 0.65 / 3840)


@pytest.mark.parametrize("positions", ["local", "global"])
def test_position_ids_are_tile_local_or_canvas_coordinates(flux_backend, positions):
    ids, restore = calls_of(flux_backend, "img_ids")
    try:
        result = generate_result(PROMPT, model=flux_backend, size="768x512", steps=1, seed=1, tile=256, overlap=64,
                                 shift=False, positions=positions, coherence="none")  # fmt: skip
    finally:
        restore()
    tiles = result.run.tiles_per_step
    if positions == "local":  # every call (a batch of tiles) has the ids of one 256-px image: rows and cols 0..15
        assert len(ids) == result.run.model_calls
        for i in ids:
            assert i.shape == (256, 3) and i[:, 1].max() == 15 and i[:, 2].max() == 15 and i[:, 0].abs().max() == 0
    else:  # one call per tile, whose ids start at its place on the canvas (in 2x2 tokens)
        assert len(ids) == tiles
        from gigadiff.grids import grid_plan

        grid = grid_plan(result.settings, flux_backend.info).grid(0)
        for i, tile in zip(ids, grid.tiles, strict=True):
            assert (int(i[:, 1].min()), int(i[:, 2].min())) == (tile.y // 2, tile.x // 2)
            assert (int(i[:, 1].max()), int(i[:, 2].max())) == (tile.y // 2 + 15, tile.x // 2 + 15)


def test_z_image_global_positions_offset_its_own_ids(tiny_z_image_dir):
    backend = open_backend(str(tiny_z_image_dir), device="cpu")
    local = generate(PROMPT, model=backend, size="768x512", steps=2, seed=1, tile=256, overlap=64,
                     coherence="none", output_type="latent")  # fmt: skip
    moved = generate(PROMPT, model=backend, size="768x512", steps=2, seed=1, tile=256, overlap=64,
                     coherence="none", positions="global", output_type="latent")  # fmt: skip
    assert not torch.equal(local, moved)
    built = backend.transformer.patchify_and_embed  # restored after the call
    assert built.__func__ is type(backend.transformer).patchify_and_embed


def test_every_flow_scheduler_runs_tiled_and_noising_follows_the_flow_rule(flux_backend):
    from gigadiff.recipes.steps import noised

    for name in ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "deis", "lcm"):
        out = generate(PROMPT, model=flux_backend, size="512x256", steps=3, seed=4, tile=256, overlap=64,
                       scheduler=name, output_type="latent")  # fmt: skip
        assert out.shape == (1, 16, 32, 64) and torch.isfinite(out).all(), name
    scheduler = flux_backend.scheduler("default", 4, None, 0.5)
    clean, noise = torch.ones(1, 16, 4, 4), torch.zeros(1, 16, 4, 4)
    sigma = float(scheduler.sigmas[1])
    assert torch.allclose(noised("flow", scheduler, clean, noise, 1), torch.full_like(clean, 1 - sigma))


@pytest.mark.slow
def test_a_flux_progressive_run_keeps_its_stages_on_whole_tokens(flux_backend):
    staged = generate_result(PROMPT, model=flux_backend, size="2304x1152", steps=2, seed=2, tile=512, overlap=128,
                             coherence="progressive")  # fmt: skip
    assert staged.latents.shape == (1, 16, 144, 288)
    assert torch.isfinite(staged.latents).all()


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_their_vaes_decode_and_encode_tiled_as_whole(family, tiny_flux_dir, tiny_klein_dir):
    """The 16-channel AutoencoderKL (shift and scale) and AutoencoderKLFlux2 (patchified, BatchNorm) through
    gigadiff's tiled VAE: exact mode equals the VAE's own whole-image decode of the same canvas; a photo's
    tiled encode equals its whole encode."""
    from skimage import data

    from gigadiff.vae.tiling import VaeTiling

    backend = open_backend(str(tiny_flux_dir if family == "flux" else tiny_klein_dir), device="cpu")
    codec, vae = backend.codec, backend.codec.vae
    photo = torch.from_numpy(data.astronaut()[:256, :384]).permute(2, 0, 1)[None].float() / 127.5 - 1
    exact = VaeTiling(mode="exact", memory_gb=0.002)
    latents = codec.encode(photo, None, exact)
    with torch.no_grad():
        whole_z = vae.encode(photo).latent_dist.mean
        if family == "flux":
            whole_z = (whole_z - vae.config.shift_factor) * vae.config.scaling_factor
        else:
            whole_z = codec.from_vae(whole_z)
        whole_image = vae.decode(codec.to_vae(latents) / getattr(vae.config, "scaling_factor", 1)
                                 + (getattr(vae.config, "shift_factor", 0) or 0)).sample.clamp(-1, 1)  # fmt: skip
    assert latents.shape == whole_z.shape and (latents - whole_z).abs().max() <= 1e-3
    tiled = codec.decode(latents, exact)
    assert tiled.shape == (1, 3, 256, 384) and (tiled - whole_image).abs().max() <= 1e-3
    fast = codec.decode(latents, VaeTiling(mode="fast", memory_gb=0.03))
    assert (fast - whole_image).pow(2).mean().sqrt() < 0.05


def test_global_position_ids_stay_exact_integers_beyond_4096_px_in_bf16(tiny_flux_dir):
    """bf16 holds integers exactly only up to 256: ids made in the model's dtype would give neighbouring columns
    of a canvas wider than 4096 px (256 tokens) the same rotary position."""
    backend = open_backend(str(tiny_flux_dir), device="cpu", dtype="bf16")
    assert backend.denoiser.dtype == torch.bfloat16
    ids, restore = calls_of(backend, "img_ids")
    try:
        result = generate_result(PROMPT, model=backend, size="4160x256", steps=1, seed=1, tile=256, overlap=64,
                                 shift=False, positions="global", coherence="none")  # fmt: skip
    finally:
        restore()
    from gigadiff.grids import grid_plan

    grid = grid_plan(result.settings, backend.info).grid(0)
    assert len(ids) == len(grid.tiles) and max(t.x for t in grid.tiles) // 2 + 15 > 256
    for i, tile in zip(ids, grid.tiles, strict=True):
        cols = i.double().view(16, 16, 3)[..., 2]
        expected = torch.arange(16, dtype=torch.float64) + tile.x // 2
        assert torch.equal(cols, expected.expand(16, 16)), f"tile at x={tile.x}: columns {cols[0].tolist()}"
