"""Text-to-image on one latent canvas of any size.

The order of operations mirrors diffusers' pipelines (encode prompt, set timesteps, draw the noise for the
whole canvas from the seeded generator, then step), which is what lets a one-tile canvas reproduce them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gigadiff.backends.base import Backend, ModelInfo
from gigadiff.executors.local import TileExecutor
from gigadiff.geometry import GridPlan
from gigadiff.noise import canvas_noise, seeded_generator
from gigadiff.sampler import CanvasDenoiser, StepListener, sample
from gigadiff.schedulers import make_scheduler, step_kwargs
from gigadiff.settings import GenerationSettings


@dataclass(frozen=True)
class CanvasRun:
    """The outcome of a run: the final latent canvas and what it cost."""

    latents: torch.Tensor
    model_calls: int
    evaluated_pixels: int
    tiles_per_step: int


def grid_plan(settings: GenerationSettings, info: ModelInfo) -> GridPlan:
    """The per-step tile grid, in latent pixels, for resolved settings (sizes, tile and overlap filled in)."""
    assert settings.width and settings.height and settings.tile and settings.overlap is not None, "resolve first"
    f = info.vae_scale_factor
    return GridPlan(
        height=settings.height // f,
        width=settings.width // f,
        tile=settings.tile // f,
        overlap=settings.overlap // f,
        shifted=settings.shift,
        seed=settings.seed,
        min_overlap=2 * info.edge_margin,
    )


@torch.no_grad()
def text_to_image(
    backend: Backend,
    settings: GenerationSettings,
    executor: TileExecutor,
    listener: StepListener | None = None,
) -> CanvasRun:
    info = backend.info
    device = backend.device
    cond = backend.condition(
        settings.prompt,
        settings.negative_prompt,
        settings.guidance,
        (settings.height, settings.width),
        guidance_rescale=settings.guidance_rescale,
        **settings.extra,
    )
    scheduler = make_scheduler(settings.scheduler, backend.base_scheduler)
    if settings.sigmas:
        scheduler.set_timesteps(sigmas=list(settings.sigmas), device=device)
    else:
        scheduler.set_timesteps(settings.steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    generator = seeded_generator(settings.seed)
    plan = grid_plan(settings, info)
    shape = (1, info.latent_channels, plan.height, plan.width)
    latents = canvas_noise(shape, generator, device) * scheduler.init_noise_sigma
    denoiser = CanvasDenoiser(backend, cond, executor, plan, settings.weights, info.edge_margin)
    latents = sample(
        denoiser,
        scheduler,
        latents,
        scheduler.timesteps,
        step_kwargs(scheduler, generator, settings.eta),
        listener,
    )
    return CanvasRun(latents, denoiser.model_calls, denoiser.evaluated_pixels, plan.tiles_per_step)
