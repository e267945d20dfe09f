"""What every recipe prepares before and while it steps: conditioning, a scheduler, and noising by its rule."""

from __future__ import annotations

from typing import Any

import torch

from gigadiff.backends.base import Backend
from gigadiff.settings import GenerationSettings


def condition(
    backend: Backend, settings: GenerationSettings, prompt: str, negative: str, guidance: float | None
) -> Any:
    """The backend's conditioning for one prompt of this run (the run's own, or a region's)."""
    return backend.condition(prompt, negative, guidance, (settings.height, settings.width),
                             settings.conditioning_options)  # fmt: skip


def prepared_scheduler(backend: Backend, settings: GenerationSettings) -> Any:
    """A fresh scheduler for this run with its timesteps set (the run's steps or explicit sigmas, its mu)."""
    assert settings.steps is not None
    return backend.scheduler(settings.scheduler, settings.steps, settings.sigmas, settings.mu)


def start_noise_scale(scheduler: Any) -> float:
    """What pure noise is multiplied by at the first step (EDM-style schedulers: sigma_max; flow models: 1)."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0))


def noised(backend: Backend, scheduler: Any, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """`clean` latents noised to the level of timestep `index` (the level the model sees at that step).

    Flow-matching models interpolate, x = sigma * noise + (1 - sigma) * clean (diffusers' `scale_noise`);
    DDPM-family models scale and add (`add_noise`) at the timestep.
    """
    if backend.info.scheduler_kind == "flow":
        sigma = scheduler.sigmas[index].to(clean.device, clean.dtype)
        return sigma * noise + (1.0 - sigma) * clean
    t = scheduler.timesteps[index : index + 1]
    return scheduler.add_noise(clean, noise, t)


def start_index(scheduler: Any, settings: GenerationSettings) -> int:
    """Index into `scheduler.timesteps` where a run starts: 0, or for img2img where the last steps x strength
    steps remain."""
    if settings.init_image is None or settings.strength is None or settings.steps is None:
        return 0
    kept = min(int(settings.steps * settings.strength), settings.steps)
    return max(settings.steps - kept, 0) * getattr(scheduler, "order", 1)


def denoising_start(scheduler: Any, settings: GenerationSettings) -> int:
    """`start_index`, told to the scheduler (so that its first step is that one)."""
    start = start_index(scheduler, settings)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return start
