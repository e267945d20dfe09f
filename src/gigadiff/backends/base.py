"""The contract between the model-agnostic layers (sampler, executors, recipes) and model adapters.

A backend is the only place that knows a model family: how prompts are encoded, which extra conditioning a
tile needs (SDXL's crop coordinates, FLUX's position ids), how classifier-free guidance is applied, and how
latents become pixels. Everything above it sees tensors, timesteps and tiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gigadiff.geometry import Tile


@dataclass(frozen=True)
class ModelInfo:
    """What the layers above a backend need to know about its model."""

    name: str
    family: str
    latent_channels: int
    vae_scale_factor: int
    """Image pixels per latent pixel (8 for the SD VAEs, 1 for pixel-space models)."""
    native_size: int
    """The image side, in pixels, the model was trained at; the default tile."""
    default_size: int | None = None
    """Image side used when the user gives no size; None means twice the native size."""
    default_steps: int = 30
    default_overlap_share: float = 1 / 8
    """Default overlap between neighbouring tiles as a share of the tile, and at least 4 x edge_margin (the two
    tiles' rims plus as much again to cross-fade in). Larger for models whose tiles still disagree about content
    at the last step: their cross-fades must be wide (terrain: 1/2)."""
    default_weights: str = "gaussian"
    """The fusion window used when the user names none (see gigadiff.fusion)."""
    prediction_range: tuple[float, float] | None = None
    """Bounds the model's predictions never leave (e.g. an x0 model that clamps its output), which fusion
    corrections (gigadiff.levels) must respect too; None: unbounded."""
    default_level_sync: bool = False
    """Whether tiles share one low-frequency level by default (gigadiff.levels): on for few-step models whose
    tiles otherwise paint tile-sized plateaus."""
    default_guidance: float = 7.5
    takes_prompt: bool = True
    uses_guidance: bool = True
    fixed_scheduler: bool = False
    """True when the model has exactly one sampler (e.g. consistency models): only "default" is accepted."""
    fixed_tile: bool = False
    """True when the network only accepts native-size inputs (e.g. an ONNX graph with fixed H and W)."""
    edge_margin: int = 0
    """Rim, in latent pixels, along a tile's edges where the model's output is unreliable."""
    options: tuple[str, ...] = ()
    """Backend-specific settings the model accepts (keys of GenerationSettings.extra)."""
    fingerprint: str = ""
    """Identifies the weights (not just the name), so a checkpoint is never resumed on another model."""
    output: str = "image"
    """"image" (RGB, decoded to [-1, 1]) or "heightmap" (decoded to heights in metres)."""
    can_encode: bool = False
    """True when the backend has `encode` (images to latents): needed for img2img and progressive coherence."""


class Backend(Protocol):
    info: ModelInfo
    device: torch.device
    base_scheduler: Any
    """The model's own scheduler; recipes derive the scheduler they step with from its config."""

    def condition(
        self, prompt: str, negative_prompt: str, guidance: float, canvas_px: tuple[int, int], **options: Any
    ) -> Any:
        """Encode everything the model is conditioned on for one generation of a canvas of canvas_px (h, w)."""
        ...

    def predict(self, latent_tiles: torch.Tensor, t: Any, cond: Any, tiles: Sequence[Tile]) -> torch.Tensor:
        """The model's guided prediction for a batch of tiles [N, C, h, w], returned as float32."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, H, W] to images [B, channels, H*f, W*f] in [-1, 1]."""
        ...
