"""Progressive coherence: one picture at many times a model's native size, not a grid of repeated ones.

Plain tiled text-to-image far beyond the native size paints the whole prompt into every tile. Following
DemoFusion (Du et al., 2024), the picture is first made at (about) the native size, then enlarged by x2
stages; every stage is denoised from full noise again with two kinds of guidance toward the stage before:

- skip residual: before each step the canvas is blended with the previous stage's upsampled latents noised
  to this step's level, weight c1 = ((1 + cos(pi * i / n)) / 2) ** skip_exponent at step i of n: the layout
  is imposed early and the model is free to add detail late;
- dilated global views: the canvas is split into stride x stride interleaved sub-lattices (pixel (y, x)
  belongs to view (y mod s, x mod s)), each the size of the first stage, i.e. about the model's native size.
  Every view sees the whole picture, so every region hears every other at every step. The views are
  denoised as tiles (in batches, on any executor) and interleaved back; their prediction is mixed with the
  local tiles' with weight c2 = ((1 + cos(pi * i / n)) / 2) ** dilation_exponent.

Both costs are linear in the number of pixels: the views hold as many pixels as the canvas. Stage k's stride
is 2**k; the number of stages K = ceil(log2(shorter side / native side)), so the first stage's shorter side is
at most the native side (its longer side may be longer: panoramas are then tiled from the first stage on).
Between stages the picture is decoded, enlarged (bicubic; circular for tileable output) and encoded again
with the tiled VAE, as DemoFusion does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from gigadiff.backends.base import Backend
from gigadiff.executors.local import TileExecutor
from gigadiff.geometry import GridPlan, Tile, TileGrid
from gigadiff.noise import canvas_noise, seeded_generator
from gigadiff.recipes.setup import condition, prepared_scheduler
from gigadiff.recipes.txt2img import CanvasRun, grid_plan, noised, text_to_image
from gigadiff.sampler import CanvasDenoiser, Listeners, StepListener, sample
from gigadiff.schedulers import step_kwargs
from gigadiff.settings import GenerationSettings


def stage_count(height: int, width: int, native: int) -> int:
    """How many x2 stages follow the first (sizes in the same unit, e.g. latent pixels)."""
    return max(0, math.ceil(math.log2(min(height, width) / native) - 1e-9))


def stage_sizes(height: int, width: int, native: int) -> list[tuple[int, int]]:
    """(height, width) of every stage, the first at about native size and the last exactly (height, width)."""
    k = stage_count(height, width, native)
    return [(math.ceil(height / 2 ** (k - i)), math.ceil(width / 2 ** (k - i))) for i in range(k + 1)]


def cosine_fade(step: int, steps: int, exponent: float) -> float:
    """1 at the first step, falling to about 0 at the last: ((1 + cos(pi * step / steps)) / 2) ** exponent."""
    return ((1 + math.cos(math.pi * step / steps)) / 2) ** exponent


def deinterleave(x: torch.Tensor, stride: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, s*h, s*w] with view (dy, dx) = x[..., dy::s, dx::s] as block (dy, dx).

    H and W are first padded (edge values repeated) up to multiples of the stride, h = ceil(H / s).
    """
    b, c, height, width = x.shape
    h, w = -(-height // stride), -(-width // stride)
    if (h * stride, w * stride) != (height, width):
        x = F.pad(x, (0, w * stride - width, 0, h * stride - height), mode="replicate")
    return x.reshape(b, c, h, stride, w, stride).permute(0, 1, 3, 2, 5, 4).reshape(b, c, stride * h, stride * w)


def interleave(views: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """The inverse of `deinterleave`, cropped back to height x width."""
    b, c, sh, sw = views.shape
    h, w = sh // stride, sw // stride
    x = views.reshape(b, c, stride, h, stride, w).permute(0, 1, 3, 2, 5, 4).reshape(b, c, h * stride, w * stride)
    return x[..., :height, :width]


def view_grid(height: int, width: int, stride: int) -> TileGrid:
    """The stride x stride views of a deinterleaved height x width canvas, as non-overlapping tiles."""
    h, w = -(-height // stride), -(-width // stride)
    tiles = tuple(Tile(dy * h, dx * w, h, w) for dy in range(stride) for dx in range(stride))
    return TileGrid(stride * h, stride * w, tiles)


@dataclass
class CoherentDenoiser:
    """Local tiles mixed with dilated global views, the views' share fading over the steps."""

    local: CanvasDenoiser
    stride: int
    exponent: float
    steps: int

    @property
    def plan(self) -> GridPlan:
        return self.local.plan

    @property
    def model_calls(self) -> int:
        return self.local.model_calls + self.views.model_calls

    def __post_init__(self) -> None:
        self.views = replace(self.local, weights="uniform", margin=0, model_calls=0, evaluated_pixels=0)

    def passes(self, grid: TileGrid) -> list[tuple[Any, TileGrid, torch.Tensor | None]]:
        h, w = grid.height, grid.width
        return [*self.local.passes(grid), (self.local.cond, view_grid(h, w, self.stride), None)]

    def __call__(self, x: torch.Tensor, t: Any, step: int, grid: TileGrid, listener: StepListener) -> torch.Tensor:
        local = self.local(x, t, step, grid, listener)
        weight = cosine_fade(step, self.steps, self.exponent)
        if weight < 1e-4:
            return local
        height, width = x.shape[-2:]
        views = self.views(deinterleave(x, self.stride), t, step, view_grid(height, width, self.stride), listener)
        return weight * interleave(views, self.stride, height, width) + (1 - weight) * local


@dataclass
class SkipResidual:
    """Before each step: blend in the previous stage, noised to this step's level, with a fading weight."""

    reference: torch.Tensor
    noise: torch.Tensor
    scheduler: Any
    exponent: float
    steps: int

    def __call__(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        weight = cosine_fade(step, self.steps, self.exponent)
        return weight * noised(self.scheduler, self.reference, self.noise, step) + (1 - weight) * latents


def enlarge(image: torch.Tensor, height: int, width: int, wrap: tuple[bool, bool]) -> torch.Tensor:
    """Bicubic resize of [B, C, H, W] to height x width; a wrapped axis is resized as a ring (no edge effects)."""
    pad_y, pad_x = (4 if wrap[0] else 0), (4 if wrap[1] else 0)
    if pad_y or pad_x:
        image = F.pad(image, (pad_x, pad_x, pad_y, pad_y), mode="circular")
    sy, sx = height / (image.shape[2] - 2 * pad_y), width / (image.shape[3] - 2 * pad_x)
    size = (height + round(2 * pad_y * sy), width + round(2 * pad_x * sx))
    out = F.interpolate(image, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
    oy, ox = round(pad_y * sy), round(pad_x * sx)
    return out[..., oy : oy + height, ox : ox + width]


@torch.no_grad()
def progressive(
    backend: Backend, settings: GenerationSettings, executor: TileExecutor, listener: StepListener | None = None
) -> CanvasRun:
    """The first stage by plain tiled text-to-image, then every x2 stage with skip residual and dilated views."""
    info = backend.info
    f = info.vae_scale_factor
    assert settings.width and settings.height and settings.steps
    sizes = stage_sizes(settings.height // f, settings.width // f, info.native_size // f)
    h0, w0 = sizes[0]
    first = text_to_image(backend, replace(settings, width=w0 * f, height=h0 * f), executor, listener)
    latents, calls, pixels = first.latents, first.model_calls, first.evaluated_pixels
    for k, (h, w) in enumerate(sizes[1:], start=1):
        stage = replace(settings, width=w * f, height=h * f)
        image = enlarge(backend.decode(latents), h * f, w * f, settings.wrap)
        reference = backend.encode(image).to(backend.device, torch.float32)  # type: ignore[attr-defined]
        latents, denoiser = _stage(backend, stage, executor, listener, reference, 2**k, k)
        calls += denoiser.model_calls
        pixels += denoiser.local.evaluated_pixels + denoiser.views.evaluated_pixels
    return CanvasRun(latents, calls, pixels, grid_plan(settings, info).tiles_per_step)


def _stage(
    backend: Backend,
    settings: GenerationSettings,
    executor: TileExecutor,
    listener: StepListener | None,
    reference: torch.Tensor,
    stride: int,
    index: int,
) -> tuple[torch.Tensor, CoherentDenoiser]:
    assert settings.steps is not None and settings.height and settings.width
    info = backend.info
    cond = condition(backend, settings, settings.prompt, settings.negative_prompt, settings.guidance)
    scheduler = prepared_scheduler(backend, settings)
    generator = seeded_generator((settings.seed + index) % 2**64)  # each stage its own, reproducible noise
    noise = canvas_noise(tuple(reference.shape), generator, backend.device)
    steps = len(scheduler.timesteps)
    local = CanvasDenoiser(backend, cond, executor, grid_plan(settings, info), settings.weights, info.edge_margin)
    denoiser = CoherentDenoiser(local, stride, settings.dilation_exponent, steps)
    guide = SkipResidual(reference, noise, scheduler, settings.skip_exponent, steps)
    start = noised(scheduler, reference, noise, 0)
    latents = sample(denoiser, scheduler, start, scheduler.timesteps, step_kwargs(scheduler, generator, settings.eta),
                     Listeners(listener), guide=guide)  # fmt: skip
    return latents, denoiser
