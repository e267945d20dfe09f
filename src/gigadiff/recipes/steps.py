"""The steps every recipe takes: a scheduler set for the run, the starting canvas (noise, or an image noised to
the strength's level by the model's rule), the fused denoiser, and the loop with its checkpoints.

The order mirrors diffusers' pipelines (encode prompt, set timesteps, draw the noise for the whole canvas from
the seeded generator, then step), which is what lets a one-tile canvas reproduce them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gigadiff.checkpoint import Checkpoint, restore_scheduler, save_checkpoint, scheduler_state
from gigadiff.events import Listeners, NullListener
from gigadiff.facts import ModelInfo, SchedulerKind
from gigadiff.grids import grid_plan
from gigadiff.io.images import load_resized
from gigadiff.noise import canvas_noise, seeded_generator
from gigadiff.recipes.context import RunContext
from gigadiff.recipes.regional import region_layers, with_region_seeds
from gigadiff.sampler import CanvasDenoiser, Denoiser, sample
from gigadiff.schedulers import step_kwargs
from gigadiff.settings import GenerationSettings


def prepared_scheduler(ctx: RunContext) -> Any:
    """A fresh scheduler for this run with its timesteps set (the run's steps or explicit sigmas, its mu)."""
    s = ctx.settings
    return ctx.backend.scheduler(s.scheduler, s.steps, s.sigmas, s.mu)


def start_noise_scale(scheduler: Any) -> float:
    """What pure noise is multiplied by at the first step (EDM-style schedulers: sigma_max; flow models: 1)."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0))


def noised(kind: SchedulerKind, scheduler: Any, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """`clean` latents noised to the level of timestep `index` (the level the model sees at that step).

    Flow-matching models interpolate, x = sigma * noise + (1 - sigma) * clean (diffusers' `scale_noise`);
    DDPM-family models scale and add (`add_noise`) at the timestep.
    """
    if kind == "flow":
        sigma = scheduler.sigmas[index].to(clean.device, clean.dtype)
        return sigma * noise + (1.0 - sigma) * clean
    t = scheduler.timesteps[index : index + 1]
    return scheduler.add_noise(clean, noise, t)


def start_index(scheduler: Any, settings: GenerationSettings, info: ModelInfo) -> int:
    """Index into `scheduler.timesteps` where a run starts: 0, or for img2img where the model's img2img pipeline
    starts (ModelInfo.skipped_steps), in the scheduler's evaluations."""
    if settings.init is None or settings.strength is None:
        return 0
    return info.skipped_steps(settings.steps, settings.strength) * getattr(scheduler, "order", 1)


def denoising_start(scheduler: Any, settings: GenerationSettings, info: ModelInfo) -> int:
    """`start_index`, told to the scheduler (so that its first step is that one)."""
    start = start_index(scheduler, settings, info)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return start


def initial_noise(shape: tuple[int, ...], generator: torch.Generator, settings: GenerationSettings,
                  weights: list[torch.Tensor], offset: int = 0) -> torch.Tensor:  # fmt: skip
    """The run's noise for the whole canvas, redrawn inside regions (of these `weights`) that bring their own
    seed (each drawn with seed + `offset`: a progressive stage's own noise)."""
    noise = canvas_noise(shape, generator, "cpu")
    if settings.regions:
        noise = with_region_seeds(noise, settings, weights, offset)
    return noise


def encoded_init(ctx: RunContext, generator: torch.Generator | None = None) -> torch.Tensor:
    """The init image resized to the canvas and encoded (tiled) into latents [1, C, H/f, W/f]."""
    s = ctx.settings
    assert s.init is not None
    if s.upscaler:
        from gigadiff.backends.upscaler import upscaled_init

        image = upscaled_init(s.init, s.upscaler, s.width, s.height, ctx.backend.device)
    else:
        image = load_resized(s.init, s.width, s.height)
    return ctx.backend.codec.encode(image, generator, ctx.vae, ctx.events).to(ctx.backend.device, torch.float32)


def drawn(ctx: RunContext, cond: Any, generator: torch.Generator, seed: int) -> Any:
    """`cond` with what it draws from the run's generator (FLUX.1's and Qwen-Image's ControlNet images), drawn
    before the noise as diffusers draws it; on a resume, from a generator seeded with `seed`: the same draws."""
    draws = seeded_generator(seed) if ctx.resume is not None else generator
    return ctx.backend.drawn_conditioning(cond, draws, ctx.vae, ctx.events)


def canvas_denoiser(ctx: RunContext, cond: Any, weights: list[torch.Tensor]) -> CanvasDenoiser:
    """The fused model of a run: its tiles, fusion window and rims, and a layer per region."""
    info = ctx.backend.info
    layers = region_layers(ctx, cond, weights) if ctx.settings.regions else ()
    return CanvasDenoiser(ctx.backend, cond, ctx.executor, grid_plan(ctx.settings, info), ctx.settings.weights,
                          info.edge_margin, layers)  # fmt: skip


def resumed(ctx: RunContext, scheduler: Any, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """The canvas and the step a resumed run continues from, its scheduler and generator as they were."""
    assert ctx.resume is not None
    restore_scheduler(scheduler, ctx.resume.scheduler_state)
    generator.set_state(ctx.resume.generator_state)
    return ctx.resume.latents.to(ctx.backend.device), ctx.resume.step


class CheckpointWriter(NullListener):
    """A step listener that saves the run's full state every K steps (a progressive stage's with its index,
    reference and noise)."""

    def __init__(self, ctx: RunContext, scheduler: Any, generator: torch.Generator, stage: int = 0,
                 reference: torch.Tensor | None = None, noise: torch.Tensor | None = None):  # fmt: skip
        assert ctx.checkpoints is not None
        self.policy, self.fingerprint = ctx.checkpoints, ctx.backend.info.fingerprint
        self.scheduler, self.generator, self.total_steps = scheduler, generator, len(scheduler.timesteps)
        self.stage, self.reference, self.noise = stage, reference, noise

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        done = step + 1
        if done % self.policy.every or done >= self.total_steps or not self.policy.write:
            return
        save_checkpoint(self.policy.path, Checkpoint(
            fingerprint=self.fingerprint, step=done, latents=latents, scheduler_state=scheduler_state(self.scheduler),
            generator_state=self.generator.get_state(), record=self.policy.record, stage=self.stage,
            reference=self.reference, noise=self.noise,
        ))  # fmt: skip


def run_steps(ctx: RunContext, denoiser: Denoiser, scheduler: Any, generator: torch.Generator,
              latents: torch.Tensor, first_step: int, writer: CheckpointWriter | None = None,
              guide: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """The denoising loop from `first_step`, heard by the run's listener and its checkpoint writer."""
    kwargs = step_kwargs(scheduler, generator, ctx.settings.eta)
    return sample(denoiser, scheduler, latents, scheduler.timesteps, kwargs, Listeners(writer, ctx.events),
                  first_step=first_step, guide=guide,
                  counted_from=start_index(scheduler, ctx.settings, ctx.backend.info))  # fmt: skip


def padded(x: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """[..., H, W] extended by pad = (rows, columns) on each side, edge values repeated (see grids.border_pad)."""
    if not any(pad):
        return x
    return torch.nn.functional.pad(x, (pad[1], pad[1], pad[0], pad[0]), mode="replicate")


def cropped(x: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """The inverse of `padded`."""
    return x[..., pad[0] : x.shape[-2] - pad[0], pad[1] : x.shape[-1] - pad[1]]
