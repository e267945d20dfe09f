"""Text-to-image, and image-to-image from an init image, on one latent canvas of any size.

The order of operations mirrors diffusers' pipelines (encode prompt, set timesteps, draw the noise for the
whole canvas from the seeded generator, then step), which is what lets a one-tile canvas reproduce them.
With an init image the canvas starts from the image's latents (tiled VAE encode), noised to the timestep the
strength selects by the model's own rule, and only the remaining steps run (steps x strength of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gigadiff.backends.base import Backend
from gigadiff.checkpoint import Checkpoint, restore_scheduler, save_checkpoint, scheduler_state
from gigadiff.executors.local import TileExecutor
from gigadiff.grids import StepRange, border_pad, grid_plan
from gigadiff.io.images import load_resized
from gigadiff.levels import LevelConsensus
from gigadiff.noise import canvas_noise, seeded_generator
from gigadiff.recipes.regional import region_layers, region_weights, with_region_seeds
from gigadiff.recipes.setup import (
    condition,
    denoising_start,
    noised,
    prepared_scheduler,
    start_index,
    start_noise_scale,
)
from gigadiff.sampler import CanvasDenoiser, Listeners, NullListener, StepListener, sample
from gigadiff.schedulers import step_kwargs
from gigadiff.settings import GenerationSettings
from gigadiff.vae.tiling import VaeTiling


@dataclass(frozen=True)
class CanvasRun:
    """The outcome of a run: the final latent canvas and what it cost."""

    latents: torch.Tensor
    model_calls: int
    evaluated_pixels: int
    tiles_per_step: int
    steps: StepRange
    """The timesteps of the (final stage's) schedule that ran."""


@dataclass(frozen=True)
class CheckpointPolicy:
    """Write a checkpoint to `path` after every `every` steps (only where `write` is true: rank 0)."""

    path: Path
    every: int
    settings: GenerationSettings
    """The whole run's resolved settings (not a progressive stage's), recorded in the checkpoint."""
    record: dict[str, Any]
    """The resolved run request, recorded in the checkpoint."""
    write: bool = True


class CheckpointWriter(NullListener):
    """A step listener that saves the run's full state every K steps."""

    def __init__(self, policy: CheckpointPolicy, backend: Backend, scheduler: Any, generator: torch.Generator,
                 total_steps: int, stage: int = 0, reference: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None):  # fmt: skip
        self.policy, self.backend = policy, backend
        self.scheduler, self.generator, self.total_steps = scheduler, generator, total_steps
        self.stage, self.reference, self.noise = stage, reference, noise

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        done = step + 1
        if done % self.policy.every or done >= self.total_steps or not self.policy.write:
            return
        save_checkpoint(
            self.policy.path,
            Checkpoint(
                settings=self.policy.settings,
                fingerprint=self.backend.info.fingerprint,
                step=done,
                latents=latents,
                scheduler_state=scheduler_state(self.scheduler),
                generator_state=self.generator.get_state(),
                record=self.policy.record,
                stage=self.stage,
                reference=self.reference,
                noise=self.noise,
            ),
        )


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator, settings: GenerationSettings, weights: list[torch.Tensor],
    offset: int = 0,
) -> torch.Tensor:  # fmt: skip
    """The run's noise for the whole canvas, redrawn inside regions (of these `weights`) that bring their own
    seed (each drawn with seed + `offset`: a progressive stage's own noise)."""
    noise = canvas_noise(shape, generator, "cpu")
    if settings.regions:
        noise = with_region_seeds(noise, settings, weights, offset)
    return noise


def encode_init_image(backend: Backend, settings: GenerationSettings, vae: VaeTiling,
                      generator: torch.Generator | None = None,
                      listener: StepListener | None = None) -> torch.Tensor:  # fmt: skip
    """The init image resized to the canvas and encoded (tiled) into latents [1, C, H/f, W/f]."""
    assert settings.init_image is not None and settings.width and settings.height
    image = load_resized(settings.init_image, settings.width, settings.height)
    return backend.codec.encode(image, generator, vae, listener).to(backend.device, torch.float32)


def canvas_denoiser(backend: Backend, settings: GenerationSettings, executor: TileExecutor, cond: Any,
                    weights: list[torch.Tensor]) -> CanvasDenoiser:  # fmt: skip
    """The fused model of a run: its tiles, fusion window and rims, and a layer per region."""
    info = backend.info
    layers = region_layers(backend, settings, cond, weights) if settings.regions else ()
    return CanvasDenoiser(backend, cond, executor, grid_plan(settings, info), settings.weights or "gaussian",
                          info.edge_margin, layers)  # fmt: skip


@torch.no_grad()
def text_to_image(
    backend: Backend,
    settings: GenerationSettings,
    executor: TileExecutor,
    listener: StepListener | None = None,
    checkpoints: CheckpointPolicy | None = None,
    resume: Checkpoint | None = None,
    vae: VaeTiling | None = None,
    weights: list[torch.Tensor] | None = None,
) -> CanvasRun:
    """Generate from noise (or from `settings.init_image`), or continue from `resume`; with `checkpoints`,
    save the state every K steps. `weights`: the regions' weights on this canvas (computed from the settings
    when not given; a progressive stage brings them down from the full canvas)."""
    info = backend.info
    device = backend.device
    vae = vae or VaeTiling(wrap=settings.wrap)
    cond = condition(backend, settings, settings.prompt, settings.negative_prompt, settings.guidance)
    scheduler = prepared_scheduler(backend, settings)
    generator = seeded_generator(settings.seed)
    plan = grid_plan(settings, info)
    pad = border_pad(settings, info)
    if weights is None:
        weights = region_weights(settings, info.vae_scale_factor)
    weights = [padded(w[None, None], pad)[0, 0] for w in weights]
    if resume is None:
        shape = (1, info.latent_channels, plan.height, plan.width)
        first_step = 0
        if settings.init_image is None:
            latents = initial_noise(shape, generator, settings, weights).to(device) * start_noise_scale(scheduler)
        else:  # as diffusers: the posterior sample is drawn before the noise, from the same generator
            first_step = denoising_start(scheduler, settings)
            init = padded(encode_init_image(backend, settings, vae, generator, listener), pad)
            noise = initial_noise(shape, generator, settings, weights).to(device)
            latents = noised(backend, scheduler, init, noise, first_step)
    else:
        restore_scheduler(scheduler, resume.scheduler_state)
        generator.set_state(resume.generator_state)
        latents = resume.latents.to(device)
        first_step = resume.step
    writer = None
    if checkpoints is not None:
        writer = CheckpointWriter(checkpoints, backend, scheduler, generator, len(scheduler.timesteps))
    local = canvas_denoiser(backend, settings, executor, cond, weights)
    denoiser = LevelConsensus(local) if settings.level_sync else local
    latents = sample(denoiser, scheduler, latents, scheduler.timesteps, step_kwargs(scheduler, generator, settings.eta),
                     Listeners(writer, listener), first_step=first_step)  # fmt: skip
    steps = StepRange(start_index(scheduler, settings), len(scheduler.timesteps))
    image = latents[..., pad[0] : latents.shape[-2] - pad[0], pad[1] : latents.shape[-1] - pad[1]]
    return CanvasRun(image, denoiser.model_calls, denoiser.evaluated_pixels, plan.tiles_per_step, steps)


def padded(x: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """[..., H, W] extended by pad = (rows, columns) on each side, edge values repeated (see grids.border_pad)."""
    if not any(pad):
        return x
    return torch.nn.functional.pad(x, (pad[1], pad[1], pad[0], pad[0]), mode="replicate")
