"""What every recipe prepares before it steps: the model's conditioning and a fresh scheduler for the run."""

from __future__ import annotations

from typing import Any

from gigadiff.backends.base import Backend
from gigadiff.schedulers import make_scheduler
from gigadiff.settings import GenerationSettings


def condition(
    backend: Backend, settings: GenerationSettings, prompt: str, negative: str, guidance: float | None
) -> Any:
    """The backend's conditioning for one prompt of this run (the run's own, or a region's)."""
    return backend.condition(prompt, negative, guidance, (settings.height, settings.width),
                             guidance_rescale=settings.guidance_rescale, **settings.extra)  # fmt: skip


def prepared_scheduler(backend: Backend, settings: GenerationSettings) -> Any:
    """A fresh scheduler for this run with its timesteps set (the run's steps or explicit sigmas), from step 0."""
    scheduler = make_scheduler(settings.scheduler, backend.base_scheduler)
    if settings.sigmas:
        scheduler.set_timesteps(sigmas=list(settings.sigmas), device=backend.device)
    else:
        scheduler.set_timesteps(settings.steps, device=backend.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler
