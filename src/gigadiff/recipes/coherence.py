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

With the other recipes:
- regional prompts act on every stage: each region's weights are brought down to the stage's canvas, the
  local tiles fuse a layer per region, and the dilated views carry the same layers with their weights
  deinterleaved like the canvas (a view pixel hears the regions of the canvas pixel it is);
- an init image starts every stage (resized to the stage, noised to the strength's level: the stage runs the
  last steps x strength steps), and the skip residual pulls the stage toward the earlier stage's result as
  usual, so each stage keeps the picture's own detail at its scale and the layout decided below it;
- checkpoints record the stage, its reference and its noise: a run resumes inside the stage it stopped in.
Sizes of models that pack latents into tokens (FLUX: 2x2) are kept on whole tokens at every stage, and the
views are padded to whole tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from gigadiff.backends.base import Backend
from gigadiff.checkpoint import Checkpoint, restore_scheduler
from gigadiff.executors.local import TileExecutor
from gigadiff.geometry import GridPlan, Tile, TileGrid
from gigadiff.grids import StepRange, border_pad, grid_plan
from gigadiff.noise import seeded_generator
from gigadiff.recipes.regional import region_weights
from gigadiff.recipes.setup import condition, denoising_start, noised, prepared_scheduler, start_index
from gigadiff.recipes.txt2img import (
    CanvasRun,
    CheckpointPolicy,
    CheckpointWriter,
    canvas_denoiser,
    encode_init_image,
    initial_noise,
    text_to_image,
)
from gigadiff.sampler import CanvasDenoiser, Layer, Listeners, StepListener, sample
from gigadiff.schedulers import step_kwargs
from gigadiff.settings import GenerationSettings
from gigadiff.vae.tiling import VaeTiling


def stage_count(height: int, width: int, native: int) -> int:
    """How many x2 stages follow the first (sizes in the same unit, e.g. latent pixels)."""
    return max(0, math.ceil(math.log2(min(height, width) / native) - 1e-9))


def stage_sizes(height: int, width: int, native: int, unit: int = 1) -> list[tuple[int, int]]:
    """(height, width) of every stage, the first at about native size and the last exactly (height, width);
    every size a whole number of `unit`s (a model's token)."""
    k = stage_count(height, width, native)

    def side(length: int, i: int) -> int:
        return -(-math.ceil(length / 2 ** (k - i)) // unit) * unit

    return [(side(height, i), side(width, i)) for i in range(k)] + [(height, width)]


def cosine_fade(step: int, steps: int, exponent: float) -> float:
    """1 at the first step, falling to about 0 at the last: ((1 + cos(pi * step / steps)) / 2) ** exponent."""
    return ((1 + math.cos(math.pi * step / steps)) / 2) ** exponent


def deinterleave(x: torch.Tensor, stride: int, unit: int = 1) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, s*h, s*w] with view (dy, dx) = x[..., dy::s, dx::s] as block (dy, dx).

    H and W are first padded (edge values repeated) so that every view is a whole number of `unit`s,
    h = ceil(H / s) rounded up to the unit.
    """
    b, c, height, width = x.shape
    h, w = view_size(height, stride, unit), view_size(width, stride, unit)
    if (h * stride, w * stride) != (height, width):
        x = F.pad(x, (0, w * stride - width, 0, h * stride - height), mode="replicate")
    return x.reshape(b, c, h, stride, w, stride).permute(0, 1, 3, 2, 5, 4).reshape(b, c, stride * h, stride * w)


def view_size(length: int, stride: int, unit: int = 1) -> int:
    """A view's side: ceil(length / stride), rounded up to whole units."""
    return math.ceil(math.ceil(length / stride) / unit) * unit


def interleave(views: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """The inverse of `deinterleave`, cropped back to height x width."""
    b, c, sh, sw = views.shape
    h, w = sh // stride, sw // stride
    x = views.reshape(b, c, stride, h, stride, w).permute(0, 1, 3, 2, 5, 4).reshape(b, c, h * stride, w * stride)
    return x[..., :height, :width]


def view_grid(height: int, width: int, stride: int, unit: int = 1) -> TileGrid:
    """The stride x stride views of a deinterleaved height x width canvas, as non-overlapping tiles."""
    h, w = view_size(height, stride, unit), view_size(width, stride, unit)
    tiles = tuple(Tile(dy * h, dx * w, h, w) for dy in range(stride) for dx in range(stride))
    return TileGrid(stride * h, stride * w, tiles)


@dataclass
class CoherentDenoiser:
    """Local tiles mixed with dilated global views, the views' share fading over the steps."""

    local: CanvasDenoiser
    stride: int
    exponent: float
    steps: int
    unit: int = 1

    @property
    def plan(self) -> GridPlan:
        return self.local.plan

    @property
    def model_calls(self) -> int:
        return self.local.model_calls + self.views.model_calls

    def __post_init__(self) -> None:
        layers = [Layer(layer.cond, deinterleave(layer.weight[None, None], self.stride, self.unit)[0, 0],
                        layer.skip_below) for layer in self.local.layers]  # fmt: skip
        self.views = replace(self.local, weights="uniform", margin=0, model_calls=0, evaluated_pixels=0, layers=layers)

    def _views(self, grid: TileGrid) -> TileGrid:
        return view_grid(grid.height, grid.width, self.stride, self.unit)

    def passes(self, grid: TileGrid) -> list[tuple[Any, TileGrid, torch.Tensor | None]]:
        return [*self.local.passes(grid), *self.views.passes(self._views(grid))]

    def __call__(self, x: torch.Tensor, t: Any, step: int, grid: TileGrid, listener: StepListener) -> torch.Tensor:
        local = self.local(x, t, step, grid, listener)
        weight = cosine_fade(step, self.steps, self.exponent)
        if weight < 1e-4:
            return local
        height, width = x.shape[-2:]
        views = self.views(deinterleave(x, self.stride, self.unit), t, step, self._views(grid), listener)
        return weight * interleave(views, self.stride, height, width) + (1 - weight) * local


@dataclass
class SkipResidual:
    """Before each step: blend in the previous stage, noised to this step's level, with a fading weight."""

    backend: Backend
    reference: torch.Tensor
    noise: torch.Tensor
    scheduler: Any
    exponent: float
    steps: int

    def __call__(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        weight = cosine_fade(step, self.steps, self.exponent)
        return weight * noised(self.backend, self.scheduler, self.reference, self.noise, step) + (1 - weight) * latents


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
    backend: Backend,
    settings: GenerationSettings,
    executor: TileExecutor,
    listener: StepListener | None = None,
    checkpoints: CheckpointPolicy | None = None,
    resume: Checkpoint | None = None,
    vae: VaeTiling | None = None,
) -> CanvasRun:
    """The first stage by plain tiled generation, then every x2 stage with skip residual and dilated views;
    with `resume`, from the stage and step it records."""
    info = backend.info
    f = info.vae_scale_factor
    vae = vae or VaeTiling(wrap=settings.wrap)
    assert settings.width and settings.height and settings.steps
    assert border_pad(settings, info) == (0, 0), "stages of models with untrusted tile rims are not padded yet"
    sizes = stage_sizes(settings.height // f, settings.width // f, info.native_size // f, info.latent_multiple)
    calls = pixels = 0
    latents: torch.Tensor | None = None
    run: CanvasRun | None = None
    events = Listeners(listener)
    for k, (h, w) in enumerate(sizes):
        if resume is not None and k < resume.stage:
            continue
        events.on_phase(f"stage {k + 1}/{len(sizes)}", None)
        stage = replace(settings, width=w * f, height=h * f)
        weights = region_weights(settings, f, (h, w)) if settings.regions else []
        own = resume if resume is not None and resume.stage == k else None
        if k == 0:
            run = text_to_image(backend, stage, executor, listener, checkpoints, own, vae, weights)
        else:
            if own is not None:
                assert own.reference is not None
                reference = own.reference.to(backend.device)
            else:
                assert latents is not None
                image = enlarge(backend.codec.decode(latents, vae, events), h * f, w * f, settings.wrap)
                reference = backend.codec.encode(image, None, vae, events).to(backend.device, torch.float32)
                events.on_phase(f"stage {k + 1}/{len(sizes)}", None)
            run = _stage(backend, stage, executor, listener, reference, k, weights, checkpoints, own, vae)
        latents = run.latents
        calls += run.model_calls
        pixels += run.evaluated_pixels
    assert run is not None
    return CanvasRun(run.latents, calls, pixels, grid_plan(settings, info).tiles_per_step, run.steps)


def _stage(
    backend: Backend,
    settings: GenerationSettings,
    executor: TileExecutor,
    listener: StepListener | None,
    reference: torch.Tensor,
    index: int,
    weights: list[torch.Tensor],
    checkpoints: CheckpointPolicy | None,
    resume: Checkpoint | None,
    vae: VaeTiling,
) -> CanvasRun:
    """Stage `index` (stride 2**index): its own noise and schedule, pulled toward `reference`, views mixed in."""
    assert settings.steps is not None
    info = backend.info
    cond = condition(backend, settings, settings.prompt, settings.negative_prompt, settings.guidance)
    scheduler = prepared_scheduler(backend, settings)
    generator = seeded_generator((settings.seed + index) % 2**64)  # each stage its own, reproducible noise
    first = denoising_start(scheduler, settings)
    if resume is None:
        init = encode_init_image(backend, settings, vae, generator, listener) if settings.init_image else None
        noise = initial_noise(tuple(reference.shape), generator, settings, weights, index).to(backend.device)
        latents = noised(backend, scheduler, reference if init is None else init, noise, first)
    else:
        assert resume.noise is not None
        noise = resume.noise.to(backend.device)
        restore_scheduler(scheduler, resume.scheduler_state)
        generator.set_state(resume.generator_state)
        latents = resume.latents.to(backend.device)
        first = resume.step
    steps = len(scheduler.timesteps)
    local = canvas_denoiser(backend, settings, executor, cond, weights)
    denoiser = CoherentDenoiser(local, 2**index, settings.dilation_exponent, steps, info.latent_multiple)
    guide = SkipResidual(backend, reference, noise, scheduler, settings.skip_exponent, steps)
    writer = None
    if checkpoints is not None:
        writer = CheckpointWriter(checkpoints, backend, scheduler, generator, steps, index, reference, noise)
    latents = sample(denoiser, scheduler, latents, scheduler.timesteps, step_kwargs(scheduler, generator, settings.eta),
                     Listeners(writer, listener), first_step=first, guide=guide)  # fmt: skip
    pixels = local.evaluated_pixels + denoiser.views.evaluated_pixels
    return CanvasRun(latents, denoiser.model_calls, pixels, local.plan.tiles_per_step,
                     StepRange(start_index(scheduler, settings), steps))  # fmt: skip
