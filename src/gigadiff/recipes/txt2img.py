"""Text-to-image, and image-to-image from an init image, on one latent canvas of any size.

With an init image the canvas starts from the image's latents (tiled VAE encode), noised to the timestep the
strength selects by the model's own rule, and only the remaining steps run (steps x strength of them).
"""

from __future__ import annotations

import torch

from gigadiff.grids import StepRange, border_pad, grid_plan
from gigadiff.levels import LevelConsensus
from gigadiff.noise import seeded_generator
from gigadiff.recipes.context import CanvasRun, RunContext
from gigadiff.recipes.regional import region_weights
from gigadiff.recipes.steps import (
    CheckpointWriter,
    canvas_denoiser,
    cropped,
    denoising_start,
    drawn,
    encoded_init,
    initial_noise,
    noised,
    padded,
    prepared_scheduler,
    resumed,
    run_steps,
    start_index,
    start_noise_scale,
)


@torch.no_grad()
def text_to_image(ctx: RunContext, weights: list[torch.Tensor] | None = None) -> CanvasRun:
    """Generate from noise (or from the init image), or continue from `ctx.resume`. `weights`: the regions'
    weights on this canvas (computed from the settings when not given; a progressive stage brings them down
    from the full canvas)."""
    s, info = ctx.settings, ctx.backend.info
    cond = ctx.condition(s.prompt, s.negative, s.guidance)
    scheduler = prepared_scheduler(ctx)
    generator = seeded_generator(s.seed)
    plan, pad = grid_plan(s, info), border_pad(s, info)
    if weights is None:
        weights = region_weights(s, info.vae_scale_factor)
    weights = [padded(w[None, None], pad)[0, 0] for w in weights]
    cond = drawn(ctx, cond, generator, s.seed)
    if ctx.resume is not None:
        latents, first = resumed(ctx, scheduler, generator)
    else:
        shape = (1, info.latent_channels, plan.height, plan.width)
        first = denoising_start(scheduler, s, info)
        if s.init is None:
            latents = initial_noise(shape, generator, s, weights).to(ctx.backend.device) * start_noise_scale(scheduler)
        else:  # as diffusers: the posterior sample is drawn before the noise, from the same generator
            init = padded(encoded_init(ctx, generator), pad)
            noise = initial_noise(shape, generator, s, weights).to(ctx.backend.device)
            latents = noised(info.scheduler_kind, scheduler, init, noise, first)
    writer = CheckpointWriter(ctx, scheduler, generator) if ctx.checkpoints is not None else None
    local = canvas_denoiser(ctx, cond, weights)
    denoiser = LevelConsensus(local) if s.level_sync else local
    latents = run_steps(ctx, denoiser, scheduler, generator, latents, first, writer)
    steps = StepRange(start_index(scheduler, s, info), len(scheduler.timesteps))
    return CanvasRun(cropped(latents, pad), denoiser.model_calls, denoiser.evaluated_pixels, plan.tiles_per_step,
                     steps)  # fmt: skip
