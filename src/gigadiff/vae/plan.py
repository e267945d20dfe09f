"""What a tiled VAE pass will do, decided before any generation starts, and the interface every engine offers.

Both engines (gigadiff.vae.engines) plan a pass from the same budget: `--vae-memory` is the device memory one
tile may use, whole-image passes included (fast mode's prefix and statistics pass); its default is half the free
GPU memory, 2 GB on the CPU. A budget too small for a useful tile is refused when the pass is planned, which the
run layer does before denoising, naming the smallest budget that works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import torch

    from gigadiff.vae.budget import HostPlan
    from gigadiff.vae.tiles import TileSink


@dataclass(frozen=True)
class Plan:
    """A planned pass (decode or encode) of one engine."""

    engine: str
    mode: Literal["exact", "fast"]
    budget_bytes: float
    tile: int
    """The tile core side in the pass's input pixels (exact GroupNorm: the smallest per-layer tile side)."""
    device_bytes: float
    """The device memory the plan expects its largest tile (or whole-image pass) to use: at most the budget."""
    host: HostPlan | None = None
    """Where the GroupNorm engine's exact mode keeps its whole-image buffers (RAM, or spilled to files)."""
    layer_tiles: tuple[int, ...] = ()
    """Exact GroupNorm: the output tile side of every step."""


class Engine(Protocol):
    """A tiled VAE engine: plan a pass, decode (streamed to a sink, or collected), encode."""

    factor: int
    """Image px per latent px."""

    def plan(self, batch: int, height: int, width: int, encoding: bool = False) -> Plan:
        """The plan of a pass over an input of height x width (latent px to decode, image px to encode); raises
        GigadiffError when it cannot fit the budget."""
        ...

    def decode(self, latents: torch.Tensor, sink: TileSink | None = None) -> torch.Tensor | None:
        """Diffusion-space latents [B, C, h, w] -> image [B, 3, h*f, w*f] in [-1, 1]; with `sink`, tiles are
        streamed to it (row-major) and nothing is returned: the image never exists whole in memory."""
        ...

    def encode(self, image: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """Image [B, 3, H, W] in [-1, 1] -> diffusion-space latents (the posterior's mean, or a sample drawn with
        `generator` for the whole latent at once, so tiling does not change it)."""
        ...
