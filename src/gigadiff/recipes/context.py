"""What every recipe receives: one run context built by the run layer, and what a recipe gives back.

The run layer (gigadiff.runs.execute) builds one `RunContext` per run: the loaded backend, the resolved
settings, where tiles run, who hears the run's events, how the VAE is tiled, and the run's checkpoint policy
and resume state. A recipe reads what it needs from it; a progressive run's stages are contexts of their own
(`replace`d settings and resume state).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gigadiff.grids import StepRange

if TYPE_CHECKING:
    import torch

    from gigadiff.backends.base import Backend
    from gigadiff.checkpoint import Checkpoint
    from gigadiff.events import Listener
    from gigadiff.executors.local import TileExecutor
    from gigadiff.settings import GenerationSettings
    from gigadiff.vae.tiling import VaeTiling


@dataclass(frozen=True)
class CheckpointPolicy:
    """Write a checkpoint to `path` after every `every` steps (only where `write` is true: rank 0)."""

    path: Path
    every: int
    record: dict[str, Any]
    """The resolved run request, recorded in the checkpoint."""
    write: bool = True


@dataclass(frozen=True)
class RunContext:
    """One run as a recipe sees it (see the module docstring)."""

    backend: Backend
    settings: GenerationSettings
    executor: TileExecutor
    events: Listener
    """Hears every phase, step and tile of the run (a complete listener: gigadiff.events.Listeners)."""
    vae: VaeTiling
    checkpoints: CheckpointPolicy | None = None
    resume: Checkpoint | None = None
    """Where the run continues from (None: from the start)."""

    def replace(self, **changes: Any) -> RunContext:
        return replace(self, **changes)

    def condition(self, prompt: str, negative: str, guidance: float | None) -> Any:
        """The backend's conditioning for one prompt of this run (its own, or a region's), on this canvas."""
        s = self.settings
        encoding = getattr(self.backend, "encoding", contextlib.nullcontext)  # text encoders brought to the device
        with encoding():
            return self.backend.condition(prompt, negative, guidance, (s.height, s.width), s.conditioning_options)


@dataclass(frozen=True)
class CanvasRun:
    """The outcome of a run: the final latent canvas and what it cost."""

    latents: torch.Tensor
    model_calls: int
    evaluated_pixels: int
    tiles_per_step: int
    steps: StepRange
    """The timesteps of the (final stage's) schedule that ran."""
