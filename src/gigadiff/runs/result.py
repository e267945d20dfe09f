"""A finished generation as the run layer hands it back: its canvas, what made it, and how to decode it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gigadiff.runs.metadata import generation_metadata

if TYPE_CHECKING:
    import torch

    from gigadiff.backends.base import Backend
    from gigadiff.facts import ModelInfo
    from gigadiff.recipes.context import CanvasRun
    from gigadiff.settings import GenerationSettings
    from gigadiff.vae.tiling import VaeTiling


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation: its latent canvas, the settings that made it, and what it cost."""

    latents: torch.Tensor
    settings: GenerationSettings
    backend: Backend
    run: CanvasRun
    vae: VaeTiling
    request: dict[str, Any] | None = None
    """The resolved run request."""
    vae_mode: str = ""
    notes: tuple[str, ...] = ()
    """What the run told its user (gigadiff.runs.checks.notes), recorded in the metadata."""

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    @property
    def metadata(self) -> dict[str, Any]:
        return generation_metadata(self.settings, self.info, self.run.steps, self.request, self.vae_mode, self.notes,
                                   self.backend.setup)  # fmt: skip

    def decode(self) -> torch.Tensor:
        return self.backend.codec.decode(self.latents, self.vae)
