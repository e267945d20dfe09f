"""The contract between the model-agnostic layers (run layer, recipes, sampler, executors) and model adapters.

A backend is the only place that knows a model family: how prompts are encoded, which extra conditioning a
tile needs (SDXL's crop coordinates, FLUX's position ids), how guidance is applied, how the family sets its
timesteps, and which codec turns its latents into pixels. Everything above it sees `ModelInfo`, tensors,
timesteps and tiles, and calls only the methods `Backend` and `Codec` declare: no capability is discovered
by probing attributes, and no layer above reads a family's conditioning object.

The model's facts (`ModelInfo`, read from its config files before torch or any weights load) live in
gigadiff.facts. This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from gigadiff.facts import ModelInfo

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gigadiff.events import Listener
    from gigadiff.geometry import Tile
    from gigadiff.vae.tiles import TileSink
    from gigadiff.vae.tiling import VaeTiling


class Codec(Protocol):
    """Turns a family's canvas into pixels and back: the VAE role, one component that every latent family
    shares (gigadiff.backends.codec), or a pixel-space model's own conversion (terrain heights)."""

    can_encode: bool
    streams: bool
    """Whether `stream_decode` writes tiles as they are decoded (images far larger than memory)."""

    def decode(self, latents: torch.Tensor, tiling: VaeTiling, listener: Listener | None = None) -> torch.Tensor:
        """Canvas [B, C, H, W] -> images [B, channels, H*f, W*f] (RGB in [-1, 1], or heights). `listener`
        hears the pass as a phase (on_phase / on_advance)."""
        ...

    def stream_decode(
        self, latents: torch.Tensor, sink: TileSink, tiling: VaeTiling, listener: Listener | None = None
    ) -> None: ...

    def encode(self, images: torch.Tensor, generator: torch.Generator | None, tiling: VaeTiling,
               listener: Listener | None = None) -> torch.Tensor:  # fmt: skip
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
    """A loaded model as the layers above see it (read-only facts: a run never changes its backend)."""

    @property
    def info(self) -> ModelInfo: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def codec(self) -> Codec: ...
    @property
    def setup(self) -> dict[str, Any]:
        """What the metadata records of how the model runs: dtype, offloading, quantization, a `--transformer`
        file, compilation, the attention backend."""
        ...

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

    def drawn_conditioning(self, cond: Any, generator: torch.Generator, tiling: VaeTiling,
                           listener: Listener | None = None) -> Any:  # fmt: skip
        """`cond` with the parts its pipeline draws from the run's generator before the noise (FLUX.1's ControlNet
        images, encoded by sampling the VAE's posterior); `cond` itself for most models. Called once per run, before
        the noise (on a resume, with the generator as seeded), so that a one-tile run draws what the pipeline does."""
        ...

    def drawn_like(self, cond: Any, drawn: Any) -> Any:
        """`cond` holding what `drawn` (a conditioning of the same run, after `drawn_conditioning`) drew: a region's
        conditioning shares the run's drawn parts instead of drawing them again."""
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
