"""Text-to-image, and image-to-image from an init image, on one latent canvas of any size.

The order of operations mirrors diffusers' pipelines (encode prompt, set timesteps, draw the noise for the
whole canvas from the seeded generator, then step), which is what lets a one-tile canvas reproduce them.
With an init image the canvas starts from the image's latents (tiled VAE encode), noised to the timestep the
strength selects, and only the remaining steps run (diffusers' img2img rule: steps x strength of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gigadiff.backends.base import Backend, ModelInfo
from gigadiff.checkpoint import Checkpoint, restore_scheduler, save_checkpoint, scheduler_state
from gigadiff.errors import GigadiffError
from gigadiff.executors.local import TileExecutor
from gigadiff.geometry import GridPlan
from gigadiff.io.images import load_resized
from gigadiff.levels import LevelConsensus
from gigadiff.noise import canvas_noise, seeded_generator
from gigadiff.recipes.regional import region_layers, region_weights, with_region_seeds
from gigadiff.recipes.setup import condition, prepared_scheduler
from gigadiff.sampler import CanvasDenoiser, Listeners, NullListener, StepListener, sample
from gigadiff.schedulers import step_kwargs
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
        rim_overlap=2 * info.edge_margin,
        wrap=settings.wrap,
    )


@dataclass(frozen=True)
class CheckpointPolicy:
    """Write a checkpoint to `path` after every `every` steps (only where `write` is true: rank 0)."""

    path: Path
    every: int
    model: str
    outputs: dict[str, Any]
    write: bool = True


class CheckpointWriter(NullListener):
    """A step listener that saves the run's full state every K steps."""

    def __init__(self, policy: CheckpointPolicy, settings: GenerationSettings, backend: Backend, scheduler: Any,
                 generator: torch.Generator, total_steps: int):  # fmt: skip
        self.policy, self.settings, self.backend = policy, settings, backend
        self.scheduler, self.generator, self.total_steps = scheduler, generator, total_steps

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        done = step + 1
        if done % self.policy.every or done >= self.total_steps or not self.policy.write:
            return
        save_checkpoint(
            self.policy.path,
            Checkpoint(
                settings=self.settings,
                model=self.policy.model,
                fingerprint=self.backend.info.fingerprint,
                step=done,
                latents=latents,
                scheduler_state=scheduler_state(self.scheduler),
                generator_state=self.generator.get_state(),
                outputs=self.policy.outputs,
            ),
        )


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator, settings: GenerationSettings, weights: list[torch.Tensor]
) -> torch.Tensor:
    """The run's noise for the whole canvas, redrawn inside regions (of these `weights`) that bring their own seed."""
    noise = canvas_noise(shape, generator, "cpu")
    if settings.regions:
        noise = with_region_seeds(noise, settings, weights)
    return noise


def denoising_start(scheduler: Any, steps: int, strength: float) -> int:
    """Index into `scheduler.timesteps` where an img2img run starts: the last steps x strength steps remain."""
    kept = min(int(steps * strength), steps)
    start = max(steps - kept, 0) * getattr(scheduler, "order", 1)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return start


def noised(scheduler: Any, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """`clean` latents noised to the level of step `index` of the scheduler's timesteps (before or at that step)."""
    if not hasattr(scheduler, "add_noise"):
        raise GigadiffError(f"scheduler {type(scheduler).__name__} cannot noise an image; choose another --scheduler")
    t = scheduler.timesteps[index : index + 1]
    return scheduler.add_noise(clean, noise, t)


def encode_init_image(
    backend: Backend, settings: GenerationSettings, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The init image resized to the canvas and encoded (tiled) into latents [1, C, H/f, W/f]."""
    assert settings.init_image is not None and settings.width and settings.height
    image = load_resized(settings.init_image, settings.width, settings.height)
    return backend.encode(image, generator).to(backend.device, torch.float32)  # type: ignore[attr-defined]


@torch.no_grad()
def text_to_image(
    backend: Backend,
    settings: GenerationSettings,
    executor: TileExecutor,
    listener: StepListener | None = None,
    checkpoints: CheckpointPolicy | None = None,
    resume: Checkpoint | None = None,
) -> CanvasRun:
    """Generate from noise, or continue from `resume`; with `checkpoints`, save the state every K steps."""
    info = backend.info
    device = backend.device
    cond = condition(backend, settings, settings.prompt, settings.negative_prompt, settings.guidance)
    scheduler = prepared_scheduler(backend, settings)
    generator = seeded_generator(settings.seed)
    plan = grid_plan(settings, info)
    weights = region_weights(settings, info.vae_scale_factor)
    if resume is None:
        shape = (1, info.latent_channels, plan.height, plan.width)
        first_step = 0
        if settings.init_image is None:
            latents = initial_noise(shape, generator, settings, weights).to(device) * scheduler.init_noise_sigma
        else:  # as diffusers: the posterior sample is drawn before the noise, from the same generator
            assert settings.strength is not None and settings.steps is not None
            first_step = denoising_start(scheduler, settings.steps, settings.strength)
            init = encode_init_image(backend, settings, generator)
            noise = initial_noise(shape, generator, settings, weights).to(device)
            latents = noised(scheduler, init, noise, first_step)
    else:
        restore_scheduler(scheduler, resume.scheduler_state)
        generator.set_state(resume.generator_state)
        latents = resume.latents.to(device)
        first_step = resume.step
    writer = None
    if checkpoints is not None:
        writer = CheckpointWriter(checkpoints, settings, backend, scheduler, generator, len(scheduler.timesteps))
    layers = region_layers(backend, settings, cond, weights) if settings.regions else ()
    local = CanvasDenoiser(backend, cond, executor, plan, settings.weights, info.edge_margin, layers)
    denoiser = LevelConsensus(local) if settings.level_sync else local
    latents = sample(
        denoiser,
        scheduler,
        latents,
        scheduler.timesteps,
        step_kwargs(scheduler, generator, settings.eta),
        Listeners(listener, writer),
        first_step=first_step,
    )
    return CanvasRun(latents, denoiser.model_calls, denoiser.evaluated_pixels, plan.tiles_per_step)
