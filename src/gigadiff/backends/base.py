"""The contract between the model-agnostic layers (run layer, recipes, sampler, executors) and model adapters.

A backend is the only place that knows a model family: how prompts are encoded, which extra conditioning a
tile needs (SDXL's crop coordinates, FLUX's position ids), how guidance is applied, how the family sets its
timesteps, and which codec turns its latents into pixels. Everything above it sees `ModelInfo`, tensors,
timesteps and tiles, and calls only the methods `Backend` and `Codec` declare: no capability is discovered
by probing attributes, and no layer above reads a family's conditioning object.

This module imports no torch: `ModelInfo` is what the checks before a run are made against, from a model's
config files, before its weights (or torch) are loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gigadiff.geometry import Tile
    from gigadiff.vae.engine import TileSink
    from gigadiff.vae.tiling import VaeTiling

SchedulerKind = Literal["ddpm", "flow", "consistency"]
"""How a model's noise schedule works: DDPM-family (betas, epsilon/v prediction), flow matching (sigma from 1
to 0, velocity prediction), or a consistency model (x0 prediction, its own sampler only)."""
GuidanceKind = Literal["cfg", "embedded", "none"]
"""Classifier-free guidance with a negative prompt (two passes), a guidance scale embedded in the model's
conditioning (one pass, FLUX.1-dev), or none (distilled and unconditional models)."""
PositionKind = Literal["none", "rope", "table"]
"""How the denoiser knows where a token is: not at all (convolutional UNets), rotary ids built per call (FLUX,
Z-Image, Qwen-Image: tile-local or canvas ids are equally possible), or a crop of a learned table (SD3)."""


@dataclass(frozen=True)
class ShiftRule:
    """How a flow-matching family shifts its timesteps toward high noise as images get larger.

    diffusers computes `mu` from the number of image tokens (and, for FLUX.2, the number of steps) and shifts
    every sigma by exp(mu) / (exp(mu) + 1/sigma - 1); gigadiff applies the rule to the tokens one tile holds
    (see gigadiff.backends.flow). `kind`: "none" (no shift, or not a flow model), "fixed" (a constant
    `shift`, e.g. SD3), "linear" (mu linear in tokens between base_seq_len and max_seq_len: FLUX.1, Z-Image,
    Qwen-Image), "empirical" (FLUX.2's fit over tokens and steps).
    """

    kind: Literal["none", "fixed", "linear", "empirical"] = "none"
    shift: float = 1.0
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15


@dataclass(frozen=True)
class ModelInfo:
    """What the layers above a backend need to know about its model (read from its config files)."""

    name: str
    family: str
    latent_channels: int
    vae_scale_factor: int
    """Image pixels per canvas pixel (8 for the SD VAEs, 16 for FLUX.2's patchified latents, 1 in pixel space)."""
    native_size: int
    """The image side, in pixels, the model was trained at; the default tile."""
    default_size: int | None = None
    """Image side used when the user gives no size; None means twice the native size."""
    default_steps: int = 30
    min_steps: int = 1
    """Fewest steps the model's scheduler can run (2 where it stretches its schedule to a terminal sigma, as
    Qwen-Image's does: one step leaves nothing to stretch, and diffusers returns NaN)."""
    latent_multiple: int = 1
    """Canvas pixels per token side: tiles, overlaps, shifts and the canvas are multiples of it (FLUX packs 2x2
    latent pixels into one token, so 2: 16 image pixels)."""
    default_overlap_share: float = 1 / 8
    """Default overlap between neighbouring tiles as a share of the tile, and at least 4 x edge_margin (the two
    tiles' rims plus as much again to cross-fade in). Larger for models whose tiles still disagree about content
    at the last step: their cross-fades must be wide (terrain: 1/2)."""
    default_weights: str = "gaussian"
    """The fusion window used when the user names none (see gigadiff.windows)."""
    prediction_range: tuple[float, float] | None = None
    """Bounds the model's predictions never leave (e.g. an x0 model that clamps its output), which fusion
    corrections (gigadiff.levels) must respect too; None: unbounded."""
    default_level_sync: bool = False
    """Whether tiles share one low-frequency level by default (gigadiff.levels): on for few-step models whose
    tiles otherwise paint tile-sized plateaus."""
    default_guidance: float = 7.5
    takes_prompt: bool = True
    guidance_kind: GuidanceKind = "cfg"
    true_cfg: bool = False
    """True classifier-free guidance with a negative prompt is available beside the model's own guidance
    (`--true-cfg S`: FLUX.1, whose guidance is otherwise embedded)."""
    scheduler_kind: SchedulerKind = "ddpm"
    shift_rule: ShiftRule = ShiftRule()
    positions: PositionKind = "none"
    max_global_px: int | None = None
    """Largest canvas side (image px) for which tiles can be given canvas positions (`--positions global`):
    the size of a learned position table, or of a rotary table the model precomputes; None: unlimited."""
    fixed_tile: bool = False
    """True when the network only accepts native-size inputs (e.g. an ONNX graph with fixed H and W)."""
    edge_margin: int = 0
    """Rim, in canvas pixels, along a tile's edges where the model's output is unreliable."""
    options: tuple[str, ...] = ()
    """Family-specific settings the model accepts (keys of GenerationSettings.extra)."""
    fingerprint: str = ""
    """Identifies the weights (not just the name), so a checkpoint is never resumed on another model; filled
    in when the weights are loaded."""
    output: Literal["image", "heightmap"] = "image"
    """"image" (RGB, decoded to [-1, 1]) or "heightmap" (decoded to heights in metres)."""
    can_encode: bool = False
    """True when the codec turns images into latents: needed for img2img and progressive coherence."""

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_kind != "none"

    @property
    def size_multiple(self) -> int:
        """Image pixels a size, tile or overlap must be a multiple of: one token."""
        return self.vae_scale_factor * self.latent_multiple


class Codec(Protocol):
    """Turns a family's canvas into pixels and back: the VAE role, one component that every latent family
    shares (gigadiff.backends.codec), or a pixel-space model's own conversion (terrain heights)."""

    can_encode: bool
    streams: bool
    """Whether `stream_decode` writes tiles as they are decoded (images far larger than memory)."""

    def decode(self, latents: torch.Tensor, tiling: VaeTiling, listener: Any = None) -> torch.Tensor:
        """Canvas [B, C, H, W] -> images [B, channels, H*f, W*f] (RGB in [-1, 1], or heights). `listener`
        hears the pass as a phase (on_phase / on_advance)."""
        ...

    def stream_decode(self, latents: torch.Tensor, sink: TileSink, tiling: VaeTiling, listener: Any = None) -> None: ...

    def encode(self, images: torch.Tensor, generator: torch.Generator | None, tiling: VaeTiling,
               listener: Any = None) -> torch.Tensor:  # fmt: skip
        """Images [B, 3, H, W] in [-1, 1] -> canvas latents (a posterior sample drawn with `generator`, as
        diffusers' img2img pipelines do, or the posterior mean without one)."""
        ...

    def check(self, batch: int, height_px: int, width_px: int, tiling: VaeTiling) -> str:
        """Raise GigadiffError now if decoding an image of this size cannot fit the memory settings; return the
        VAE mode the decode will use ("exact", "fast", or "" for a codec without modes)."""
        ...

    def preview(self, latents: torch.Tensor, max_side: int) -> np.ndarray:
        """A cheap RGB picture [h, w, 3] uint8 of a canvas, at most `max_side` px a side: a projection of the
        latent channels, never a decode of the canvas."""
        ...


class Backend(Protocol):
    info: ModelInfo
    device: torch.device
    codec: Codec

    def scheduler(self, name: str, steps: int, sigmas: Sequence[float] | None, mu: float | None) -> Any:
        """A fresh scheduler called `name` ("default" or a gigadiff scheduler name) configured for this model,
        its timesteps set as the family's pipeline sets them (`steps`, or explicit `sigmas`; `mu`: a flow
        model's timestep shift for this run), ready to step from index 0."""
        ...

    def condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> Any:  # fmt: skip
        """Encode everything the model is conditioned on for one generation of a canvas of canvas_px (h, w)."""
        ...

    def branches(self, cond: Any) -> int:
        """Model passes per tile: 2 with classifier-free guidance (unconditional, conditional), else 1."""
        ...

    def predict(self, latent_tiles: torch.Tensor, t: Any, cond: Any, tiles: Sequence[Tile]) -> torch.Tensor:
        """The model's guided prediction for a batch of tiles [N, C, h, w], returned as float32."""
        ...

    def predict_branch(
        self, latent_tiles: torch.Tensor, t: Any, cond: Any, tiles: Sequence[Tile], branch: int
    ) -> torch.Tensor:
        """One pass of guidance (0: unconditional, 1: conditional), to be joined by `combine`."""
        ...

    def combine(self, uncond: torch.Tensor, cond_out: torch.Tensor, cond: Any) -> torch.Tensor:
        """Guidance from the two passes of `predict_branch`; equal to `predict`."""
        ...
