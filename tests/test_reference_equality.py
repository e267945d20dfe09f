"""On a canvas that fits in one tile, gigadiff reproduces plain diffusers pipelines for the same seed."""

from __future__ import annotations

import pytest
import torch

from gigadiff.api import generate
from gigadiff.schedulers import make_scheduler


def reference_latents(pipe, scheduler: str, steps: int = 4, guidance: float = 7.5, seed: int = 3, **kw):
    base = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler, base)
    try:
        return pipe(
            "a red lighthouse",
            height=512,
            width=512,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
            **kw,
        ).images
    finally:
        pipe.scheduler = base


def ours(pipe, scheduler: str, steps: int = 4, guidance: float = 7.5, seed: int = 3, **kw):
    return generate(
        "a red lighthouse",
        model=pipe,
        size="512x512",
        steps=steps,
        guidance=guidance,
        seed=seed,
        scheduler=scheduler,
        output_type="latent",
        **kw,
    )


SCHEDULERS = ["ddim", "euler", "euler_a", "dpmpp_2m", "unipc"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_sd_matches_stable_diffusion_pipeline(sd_pipe, scheduler):
    ref = reference_latents(sd_pipe, scheduler)
    got = ours(sd_pipe, scheduler)
    assert got.shape == ref.shape == (1, 4, 64, 64)
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_sdxl_matches_stable_diffusion_xl_pipeline(sdxl_pipe, scheduler):
    ref = reference_latents(sdxl_pipe, scheduler)
    got = ours(sdxl_pipe, scheduler)
    assert (got - ref).abs().max().item() <= 1e-4


def test_v_prediction_sd2_style(tiny_sd_v_dir):
    from tests.conftest import load

    pipe = load(tiny_sd_v_dir)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    ref = reference_latents(pipe, "default", guidance_rescale=0.7)
    got = ours(pipe, "default", guidance_rescale=0.7)
    assert (got - ref).abs().max().item() <= 1e-4


def test_negative_prompt_and_no_guidance(sd_pipe, sdxl_pipe):
    for pipe in (sd_pipe, sdxl_pipe):
        ref = reference_latents(pipe, "ddim", negative_prompt="blurry")
        got = ours(pipe, "ddim", negative="blurry")
        assert (got - ref).abs().max().item() <= 1e-4
        ref = reference_latents(pipe, "euler", guidance=1.0)
        got = ours(pipe, "euler", guidance=1.0)
        assert (got - ref).abs().max().item() <= 1e-4


def test_uniform_weights_reproduce_exactly(sd_pipe):
    ref = reference_latents(sd_pipe, "ddim")
    got = ours(sd_pipe, "ddim", weights="uniform")
    assert torch.equal(got, ref)
