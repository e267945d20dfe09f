"""The `terrain` model: a pretrained EDM consistency UNet for terrain heightmaps, run by gigadiff's own loop.

The weights ship in the PyPI package adaptive-terrain-diffusion (MIT): an ONNX graph with inputs
`noisy` [B, 1, 128, 128], `sigma` [B], `difficulty` [B] in 0..1 and output `denoised` (x0, in the model's
[-1, 1] height space). gigadiff only reads the file; sampling, tiling, fusion and output are its own.

Everything specific to this model lives here: the file location, the difficulty label (1..100 on the command
line, (d - 1) / 99 for the network), the height transform (asinh-companded heights in metres, 0..22.17 m, as
the package documents), its EDM noise range, and the rim of unreliable pixels along its tile edges (measured:
gradient energy 1.5-3x the interior within ~6 px of the edges, so 8 px are damped in fusion).

The network is endpoint-distilled for one step, and one step is its default here as in the package (whose
sampler takes no other): its maps then have the model's own relief. Measured at 1024² (difficulty 60, seeds
0-2, bench/terrain_border.py for more): the mean height range of 128-px windows was 1.98, 2.52 and 2.06 m in
one step, against the package's 1.97, 2.17 and 2.04 m, with grid anisotropy 1.04, 1.17 and 1.05 (chance
factor about 1.15; the package at its 32 px overlap: 3.34, 1.97, ...). A second step (re-noised to sigma 20
and denoised again) raised that relief to 2.9-3.2 m and the highest point from 5.8-8.1 m to 10.3-10.7 m, and at
another seed pushed 192 pixels onto the network's ceiling (its graph clamps x0 to [-1, 1]: 22.17 m), because
the network denoises poorly at low noise: re-noised to sigma and denoised again, its output's high-frequency
energy is 2x the one-step output's at sigma 20, 3x at 10 and 11x at 2.5. More steps stay available
(`--steps`, `--sigmas`); their schedule stops at SIGMA_FLOOR = 20, where on a 1024² map the grid anisotropy
and seam score stayed within chance (0.94 at sigma 10, 1.12 at 20, 1.23 at 40, chance factor 1.15).

The network reads only structures wider than about 50 px from its noisy input, so neighbouring windows paint
different relief where they overlap, and every cross-fade decides where one tile's relief gives way to the
other's. With the package's 32 px overlap that is a 16 px ramp between its two 8 px rims: it reads as a
straight cliff. Its default overlap is therefore half a tile (48 px cross-fades).

The rim also runs along the canvas border, where nothing covers it: the canvas is padded by the overlap on
every side (gigadiff.grids.border_pad) and cropped after, so the map's border comes from tile interiors, with
as many tiles averaged there as anywhere else.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gigadiff.backends.family import Family
from gigadiff.errors import GigadiffError
from gigadiff.facts import ModelInfo
from gigadiff.lazy import torch

if TYPE_CHECKING:
    import torch as torch_types

    from gigadiff.backends.base import Backend
    from gigadiff.backends.loading import Loading
    from gigadiff.backends.source import ModelSource
    from gigadiff.events import Listener
    from gigadiff.geometry import Tile
    from gigadiff.vae.tiles import TileSink
    from gigadiff.vae.tiling import VaeTiling

PACKAGE = "terrain_diffusion"
WEIGHTS = "weights/terrain_consistency_unet_difficulty100.onnx"
NATIVE = 128
HEIGHT_RANGE_M = 22.16864013671875
ASINH_SCALE = 0.1
SIGMA_MIN, SIGMA_MAX, SIGMA_FLOOR = 0.002, 80.0, 20.0
EDGE_MARGIN = 8
DIFFICULTY_LEVELS = 100
DEFAULT_DIFFICULTY = 50
INSTALL_HINT = "pip install --no-deps adaptive-terrain-diffusion"


def weights_path() -> Path:
    """The ONNX file inside the installed package (found without importing it), or a clear error naming how to
    install it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GigadiffError(
            f"model 'terrain' ships in the package adaptive-terrain-diffusion, which is not installed; "
            f"install it with `{INSTALL_HINT}` (gigadiff already brings onnxruntime)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS
    if not path.is_file():
        raise GigadiffError(f"the terrain model file {WEIGHTS} is missing from {PACKAGE}; reinstall it: {INSTALL_HINT}")
    return path


def difficulty_label(difficulty: float) -> float:
    """1..100 on the command line -> the network's 0..1 conditioning."""
    if (
        isinstance(difficulty, bool)
        or not (isinstance(difficulty, int | float) and math.isfinite(difficulty))
        or not (1 <= difficulty <= DIFFICULTY_LEVELS)
    ):
        raise GigadiffError(f"{{difficulty}} must be a number from 1 to {DIFFICULTY_LEVELS}, got {difficulty!r}",
                            "difficulty")  # fmt: skip
    return (float(difficulty) - 1) / (DIFFICULTY_LEVELS - 1)


def model_to_heights(values: torch_types.Tensor) -> torch_types.Tensor:
    """Model space [-1, 1] -> heights in metres (inverse of the asinh companding used in training)."""
    unit = ((values.double() + 1) * 0.5).clamp(0, 1)
    heights = ASINH_SCALE * torch.sinh(unit * math.asinh(HEIGHT_RANGE_M / ASINH_SCALE))
    return heights.clamp(0, HEIGHT_RANGE_M).float()


def heights_to_model(heights: torch_types.Tensor) -> torch_types.Tensor:
    """Heights in metres -> the model's [-1, 1] space (the asinh companding; inverse of model_to_heights)."""
    unit = torch.asinh(heights.double().clamp(0, HEIGHT_RANGE_M) / ASINH_SCALE) / math.asinh(
        HEIGHT_RANGE_M / ASINH_SCALE
    )
    return (2 * unit - 1).float()


def file_fingerprint(path: Path) -> str:
    from gigadiff.io.files import file_sha256

    return file_sha256(path)[:16]


@dataclass(frozen=True)
class TerrainConditioning:
    label: float


class HeightCodec:
    """The terrain canvas is the heightmap itself (pixel space): decoding maps it to metres."""

    can_encode = False
    streams = False

    def decode(
        self, latents: torch_types.Tensor, tiling: VaeTiling, listener: Listener | None = None
    ) -> torch_types.Tensor:
        return model_to_heights(latents)

    def stream_decode(self, latents: torch_types.Tensor, sink: TileSink, tiling: VaeTiling,
                      listener: Listener | None = None) -> None:  # fmt: skip
        sink(0, 0, self.decode(latents, tiling))

    def encode(self, images: torch_types.Tensor, generator: Any, tiling: VaeTiling,
               listener: Listener | None = None) -> torch_types.Tensor:  # fmt: skip
        raise GigadiffError("model 'terrain' cannot encode images")

    def check(self, batch: int, height_px: int, width_px: int, tiling: VaeTiling) -> str:
        return ""

    def preview(self, latents: torch_types.Tensor, max_side: int) -> np.ndarray:
        """Grey levels of the model-space heights ([-1, 1]: the network's range)."""
        from gigadiff.backends.codec import shrink, to_rgb8

        return to_rgb8(shrink(latents[:1, :1].float().cpu(), max_side).expand(1, 3, -1, -1))


class TerrainBackend:
    """Runs the terrain consistency UNet through ONNX Runtime on tiles of gigadiff's canvas."""

    def __init__(self, info: ModelInfo, device: str = "auto", path: Path | None = None):
        from gigadiff.backends.onnx_runtime import check_io, onnx_session

        self.path = path or weights_path()
        self.session, self.runtime_device = onnx_session(self.path, device)
        check_io(self.session, {"noisy": 4, "sigma": 1, "difficulty": 1}, ("denoised",), self.path)
        self.device = torch.device("cpu")  # canvas and fusion live on the host; ONNX Runtime owns the model
        self.info = replace(info, fingerprint=file_fingerprint(self.path))
        self.setup: dict[str, Any] = {"dtype": "fp32", "offload": "none", "format": "onnx"}
        self.codec = HeightCodec()

    def scheduler(self, name: str, steps: int, sigmas: Sequence[float] | None, mu: float | None) -> Any:
        from gigadiff.consistency import ConsistencyScheduler

        scheduler = ConsistencyScheduler(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_floor=SIGMA_FLOOR)
        if sigmas:
            scheduler.set_timesteps(sigmas=list(sigmas), device=self.device)
        else:
            scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> TerrainConditioning:  # fmt: skip
        return TerrainConditioning(difficulty_label(options.get("difficulty", DEFAULT_DIFFICULTY)))

    def drawn_conditioning(self, cond: TerrainConditioning, generator: Any, tiling: Any, listener: Any = None) -> Any:
        return cond

    def drawn_like(self, cond: TerrainConditioning, drawn: TerrainConditioning) -> TerrainConditioning:
        return cond

    def branches(self, cond: TerrainConditioning) -> int:
        return 1

    def predict(self, latent_tiles: torch_types.Tensor, t: Any, cond: TerrainConditioning,
                tiles: Sequence[Tile]) -> torch_types.Tensor:  # fmt: skip
        from gigadiff.backends.onnx_runtime import run

        n = latent_tiles.shape[0]
        denoised = run(
            self.session,
            "denoised",
            {
                "noisy": latent_tiles.detach().cpu().numpy(),
                "sigma": np.full(n, float(t), dtype=np.float32),
                "difficulty": np.full(n, cond.label, dtype=np.float32),
            },
        )
        return torch.from_numpy(denoised).float()

    def predict_branch(self, latent_tiles: torch_types.Tensor, t: Any, cond: TerrainConditioning,
                       tiles: Sequence[Tile], branch: int) -> torch_types.Tensor:  # fmt: skip
        return self.predict(latent_tiles, t, cond, tiles)

    def combine(self, uncond: torch_types.Tensor, cond_out: torch_types.Tensor,
                cond: TerrainConditioning) -> torch_types.Tensor:  # fmt: skip
        return cond_out


class Terrain(Family):
    name = "terrain-consistency"
    builtin = ("terrain",)
    gpu_dtype = "fp32"  # an fp32 ONNX graph
    scheduler_kind = "consistency"
    guidance_kind = "none"
    can_encode = False
    vae = "none"

    def describe(self, source: ModelSource) -> ModelInfo:
        weights_path()  # a missing package is reported before anything loads
        return ModelInfo(
            name="terrain",
            family=self.name,
            latent_channels=1,
            vae_scale_factor=1,
            native_size=NATIVE,
            default_size=1024,
            default_steps=1,
            default_overlap_share=0.5,
            default_weights="linear",
            default_level_sync=True,
            prediction_range=(-1.0, 1.0),  # the graph clamps its x0
            default_guidance=0.0,
            takes_prompt=False,
            guidance_kind="none",
            scheduler_kind="consistency",
            fixed_tile=True,
            edge_margin=EDGE_MARGIN,
            options=("difficulty",),
            output="heightmap",
            vae_engine="none",
            gpu_dtype=self.gpu_dtype,
            diffusers_weights=False,
        )

    def load(self, source: ModelSource, info: ModelInfo, loading: Loading) -> Backend:
        if loading.dtype not in ("fp32", "auto"):
            raise GigadiffError("model 'terrain' runs in fp32 only (an fp32 ONNX graph); use {dtype} fp32 or auto",
                                "dtype")  # fmt: skip
        return TerrainBackend(info, loading.device)
