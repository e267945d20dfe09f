"""How the tiled VAE runs: its mode, memory budget, wrap-around and tile details (torch-free settings).

Kept apart from the engine so that a run's VAE settings are checked, recorded and passed around before
torch is imported. See gigadiff.vae.tiled for what the modes do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gigadiff.errors import GigadiffError

Mode = Literal["auto", "exact", "fast"]
MODES = ("auto", "exact", "fast")
SPILLING_ENGINES = ("groupnorm",)
"""The engines (gigadiff.vae.engines) that keep whole-image buffers, which `--vae-spill` moves to files."""


@dataclass(frozen=True)
class VaeTiling:
    """How to tile the VAE. memory_gb None means a default for the device (see budget.default_memory_gb)."""

    mode: str = "auto"
    """One of MODES (checked here: the request carries it as a string)."""
    memory_gb: float | None = None
    wrap: tuple[bool, bool] = (False, False)
    """(top/bottom, left/right) edges continue each other."""
    halo: int = 8
    """Fast mode: latent pixels of context on each side of a tile (the decoder's effective reach)."""
    blend: int = 2
    """Fast mode: latent pixels of its halo a tile keeps on each side of a cut, cross-faded with its neighbour's.

    The zone's far end then has halo - blend px of context; on the tiny test VAE blend 2 halves the step
    across cuts for 2 dB of PSNR, blend 4 costs 9 dB (the outer halo is the least accurate part of a tile)."""
    downsample: int = 2
    """Fast mode: the statistics pass runs the steps after its whole-image prefix on the image average-pooled by
    this factor (raised when the budget needs it); 1 runs them at full resolution: exact statistics, at the
    cost of a second pass.
    SD's full-width VAE at 1024² (random weights): 45.7 dB PSNR against the whole decode at 2, 39.2 at 4."""
    spill_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise GigadiffError(f"{{vae_mode}} must be one of {', '.join(MODES)}, got {self.mode!r}", "vae_mode")
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise GigadiffError(f"{{vae_memory}} must be a positive number of GB, got {self.memory_gb}", "vae_memory")
        if self.halo < 0 or self.downsample < 1 or not 0 <= self.blend <= self.halo:
            raise GigadiffError("tiled VAE: halo must be >= 0, blend from 0 to halo, downsample at least 1")
