"""The `terrain` model: a pretrained EDM consistency UNet for terrain heightmaps, run by gigadiff's own loop.

The weights ship in the PyPI package adaptive-terrain-diffusion (MIT): an ONNX graph with inputs
`noisy` [B, 1, 128, 128], `sigma` [B], `difficulty` [B] in 0..1 and output `denoised` (x0, in the model's
[-1, 1] height space). gigadiff only reads the file; sampling, tiling, fusion and output are its own.

Everything specific to this model lives here: the file location, the difficulty label (1..100 on the command
line, (d - 1) / 99 for the network), the height transform (asinh-companded heights in metres, 0..22.17 m, as
the package documents), its EDM noise range, and the rim of unreliable pixels along its tile edges (measured:
gradient energy 1.5-3x the interior within ~6 px of the edges, so 8 px are damped in fusion).

The network is endpoint-distilled for one step, and it denoises poorly at low noise: re-noised to sigma and
denoised again, its output's high-frequency energy is 2x the one-step output's at sigma 20, 3x at 10 and 11x
at 2.5 (measured). Its multistep schedule therefore stops at SIGMA_FLOOR = 10: low enough for deterministic
(eta = 0) steps to let tiles agree on structures that span them, high enough to keep the texture moderate.

Even at sigma 10 the network reads only structures wider than about 50 px from its noisy input, so
neighbouring windows still paint different relief where they overlap, and every cross-fade decides where one
tile's relief gives way to the other's. With the package's 32 px overlap that is a 16 px ramp between its two
8 px rims: it reads as a straight cliff, and the first step's cliffs survive every later step. Its default
overlap is therefore half a tile (48 px cross-fades), and 2 steps (sigma 80, 10) instead of 4: on a 1024² map
(seed 0) that removes the visible cliffs (grid anisotropy 1.04 -> 0.93, chance x/ 1.14) for fewer tile
evaluations in all (458 against 500) and less time.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigadiff.backends.base import ModelInfo
from gigadiff.backends.onnx_runtime import check_io, onnx_session, run
from gigadiff.consistency import ConsistencyScheduler
from gigadiff.errors import GigadiffError
from gigadiff.geometry import Tile

PACKAGE = "terrain_diffusion"
WEIGHTS = "weights/terrain_consistency_unet_difficulty100.onnx"
NATIVE = 128
HEIGHT_RANGE_M = 22.16864013671875
ASINH_SCALE = 0.1
SIGMA_MIN, SIGMA_MAX, SIGMA_FLOOR = 0.002, 80.0, 10.0
EDGE_MARGIN = 8
DIFFICULTY_LEVELS = 100
DEFAULT_DIFFICULTY = 50
INSTALL_HINT = "pip install --no-deps adaptive-terrain-diffusion"


def weights_path() -> Path:
    """The ONNX file inside the installed package, or a clear error naming how to install it."""
    try:
        resource = importlib.resources.files(PACKAGE).joinpath(WEIGHTS)
    except ModuleNotFoundError as e:
        raise GigadiffError(
            f"model 'terrain' ships in the package adaptive-terrain-diffusion, which is not installed; "
            f"install it with `{INSTALL_HINT}` (gigadiff already brings onnxruntime)"
        ) from e
    if not resource.is_file():
        raise GigadiffError(f"the terrain model file {WEIGHTS} is missing from {PACKAGE}; reinstall it: {INSTALL_HINT}")
    return Path(str(resource))


def difficulty_label(difficulty: float) -> float:
    """1..100 on the command line -> the network's 0..1 conditioning."""
    if not (isinstance(difficulty, int | float) and math.isfinite(difficulty)) or not (
        1 <= difficulty <= DIFFICULTY_LEVELS
    ):
        raise GigadiffError(f"difficulty must be a number from 1 to {DIFFICULTY_LEVELS}, got {difficulty!r}")
    return (float(difficulty) - 1) / (DIFFICULTY_LEVELS - 1)


def model_to_heights(values: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> heights in metres (inverse of the asinh companding used in training)."""
    unit = ((values.double() + 1) * 0.5).clamp(0, 1)
    heights = ASINH_SCALE * torch.sinh(unit * math.asinh(HEIGHT_RANGE_M / ASINH_SCALE))
    return heights.clamp(0, HEIGHT_RANGE_M).float()


def heights_to_model(heights: torch.Tensor) -> torch.Tensor:
    """Heights in metres -> the model's [-1, 1] space (the asinh companding; inverse of model_to_heights)."""
    unit = torch.asinh(heights.double().clamp(0, HEIGHT_RANGE_M) / ASINH_SCALE) / math.asinh(
        HEIGHT_RANGE_M / ASINH_SCALE
    )
    return (2 * unit - 1).float()


def file_fingerprint(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TerrainConditioning:
    label: float


class TerrainBackend:
    """Runs the terrain consistency UNet through ONNX Runtime on tiles of gigadiff's canvas."""

    def __init__(self, device: str = "auto", path: Path | None = None):
        self.path = path or weights_path()
        self.session, self.runtime_device = onnx_session(self.path, device)
        check_io(self.session, {"noisy": 4, "sigma": 1, "difficulty": 1}, ("denoised",), self.path)
        self.device = torch.device("cpu")  # canvas and fusion live on the host; ONNX Runtime owns the model
        self.base_scheduler = ConsistencyScheduler(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_floor=SIGMA_FLOOR)
        self.info = ModelInfo(
            fingerprint=file_fingerprint(self.path),
            name="terrain",
            family="terrain-consistency",
            latent_channels=1,
            vae_scale_factor=1,
            native_size=NATIVE,
            default_size=1024,
            default_steps=2,
            default_overlap_share=0.5,
            default_weights="linear",
            default_level_sync=True,
            prediction_range=(-1.0, 1.0),  # the graph clamps its x0
            default_guidance=0.0,
            takes_prompt=False,
            uses_guidance=False,
            fixed_scheduler=True,
            fixed_tile=True,
            edge_margin=EDGE_MARGIN,
            options=("difficulty",),
            output="heightmap",
        )

    def condition(
        self,
        prompt: str,
        negative_prompt: str,
        guidance: float | None,
        canvas_px: tuple[int, int],
        difficulty: float = DEFAULT_DIFFICULTY,
        **_: Any,
    ) -> TerrainConditioning:
        return TerrainConditioning(difficulty_label(difficulty))

    def predict(
        self, latent_tiles: torch.Tensor, t: Any, cond: TerrainConditioning, tiles: Sequence[Tile]
    ) -> torch.Tensor:
        n = latent_tiles.shape[0]
        sigma = float(t)
        denoised = run(
            self.session,
            "denoised",
            {
                "noisy": latent_tiles.detach().cpu().numpy(),
                "sigma": np.full(n, sigma, dtype=np.float32),
                "difficulty": np.full(n, cond.label, dtype=np.float32),
            },
        )
        return torch.from_numpy(denoised).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The canvas is the heightmap itself (pixel space): return heights in metres [B, 1, H, W]."""
        return model_to_heights(latents)
