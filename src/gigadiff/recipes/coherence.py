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

from gigadiff.events import Listener
from gigadiff.geometry import GridPlan, Tile, TileGrid
from gigadiff.grids import StepRange, border_pad, grid_plan
from gigadiff.noise import seeded_generator
from gigadiff.recipes.context import CanvasRun, RunContext
from gigadiff.recipes.regional import region_weights
from gigadiff.recipes.steps import (
    CheckpointWriter,
    canvas_denoiser,
    denoising_start,
    drawn,
    encoded_init,
    initial_noise,
    noised,
    prepared_scheduler,
    resumed,
    run_steps,
    start_index,
)
from gigadiff.recipes.txt2img import text_to_image
from gigadiff.sampler import CanvasDenoiser, Layer
from gigadiff.shift import tile_mu

SKIP_EXPONENT = 3.0
"""Exponent of the skip residual's cosine fade (higher: the earlier stage lets go sooner)."""
DILATION_EXPONENT = 1.0
"""Exponent of the dilated global views' cosine fade."""


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
    views: CanvasDenoiser
    """The views of the deinterleaved canvas as tiles (see `dilated_views`)."""
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

    def _views(self, grid: TileGrid) -> TileGrid:
        return view_grid(grid.height, grid.width, self.stride, self.unit)

    def passes(self, grid: TileGrid) -> list[tuple[Any, TileGrid, torch.Tensor | None]]:
        return [*self.local.passes(grid), *self.views.passes(self._views(grid))]

    def __call__(self, x: torch.Tensor, t: Any, step: int, grid: TileGrid, listener: Listener) -> torch.Tensor:
        local = self.local(x, t, step, grid, listener)
        weight = cosine_fade(step, self.steps, self.exponent)
        if weight < 1e-4:
            return local
        height, width = x.shape[-2:]
        views = self.views(deinterleave(x, self.stride, self.unit), t, step, self._views(grid), listener)
        return weight * interleave(views, self.stride, height, width) + (1 - weight) * local


def dilated_views(ctx: RunContext, local: CanvasDenoiser, stride: int) -> CanvasDenoiser:
    """The denoiser of a stage's dilated views: each view is the whole picture at a lower resolution, so it is
    conditioned as a whole picture of its size (positions as the model gives a whole image: with `--positions
    global` a view is not a block of the canvas), fused without windows (views do not overlap), and carries the
    region layers with their weights deinterleaved like the canvas."""
    s = ctx.settings
    whole = ctx.replace(settings=replace(s, positions="local")) if s.positions != "local" else ctx
    cond = whole.condition(s.prompt, s.negative, s.guidance) if whole is not ctx else local.cond
    unit = ctx.backend.info.latent_multiple
    layers = []
    for i, layer in enumerate(local.layers):
        weight = deinterleave(layer.weight[None, None], stride, unit)[0, 0]
        layer_cond = cond
        if i > 0:  # a region's own prompt (the first layer is the background's: the run's prompt)
            region = s.regions[i - 1]
            guidance = region.guidance if region.guidance is not None else s.guidance
            layer_cond = (
                whole.condition(region.prompt, region.negative_prompt, guidance) if whole is not ctx else (layer.cond)
            )
        layers.append(Layer(layer_cond, weight, layer.skip_below))
    return replace(local, cond=cond, weights="uniform", margin=0, model_calls=0, evaluated_pixels=0, layers=layers)


@dataclass
class SkipResidual:
    """Before each step: blend in the previous stage, noised to this step's level, with a fading weight."""

    ctx: RunContext
    reference: torch.Tensor
    noise: torch.Tensor
    scheduler: Any
    exponent: float
    steps: int

    def __call__(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        weight = cosine_fade(step, self.steps, self.exponent)
        reference = noised(self.ctx.backend.info.scheduler_kind, self.scheduler, self.reference, self.noise, step)
        return weight * reference + (1 - weight) * latents


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
def progressive(ctx: RunContext) -> CanvasRun:
    """The first stage by plain tiled generation, then every x2 stage with skip residual and dilated views;
    resumed from the stage and step `ctx.resume` records."""
    s, info, resume = ctx.settings, ctx.backend.info, ctx.resume
    f = info.vae_scale_factor
    assert border_pad(s, info) == (0, 0), "stages of models with untrusted tile rims are not padded yet"
    sizes = stage_sizes(s.height // f, s.width // f, info.native_size // f, info.latent_multiple)
    calls = pixels = 0
    run: CanvasRun | None = None
    for k, (h, w) in enumerate(sizes):
        if resume is not None and k < resume.stage:
            continue
        ctx.events.on_phase(f"stage {k + 1}/{len(sizes)}", None)
        own = resume if resume is not None and resume.stage == k else None
        mu = tile_mu(info, s.flow_shift, s.tile, h * f, w * f, s.steps)  # from what this stage's calls see
        stage = ctx.replace(settings=replace(s, width=w * f, height=h * f, mu=mu), resume=own)
        weights = region_weights(s, f, (h, w)) if s.regions else []
        if k == 0:
            run = text_to_image(stage, weights)
        else:
            reference = own.reference.to(ctx.backend.device) if own is not None and own.reference is not None else None
            if reference is None:
                assert run is not None
                reference = enlarged(stage, run.latents)
                ctx.events.on_phase(f"stage {k + 1}/{len(sizes)}", None)
            run = _stage(stage, reference, k, weights)
        calls += run.model_calls
        pixels += run.evaluated_pixels
    assert run is not None
    return CanvasRun(run.latents, calls, pixels, grid_plan(s, info).tiles_per_step, run.steps)


def enlarged(stage: RunContext, latents: torch.Tensor) -> torch.Tensor:
    """The previous stage's latents decoded, enlarged to this stage's size and encoded: its reference."""
    s, codec = stage.settings, stage.backend.codec
    image = enlarge(codec.decode(latents, stage.vae, stage.events), s.height, s.width, s.wrap)
    return codec.encode(image, None, stage.vae, stage.events).to(stage.backend.device, torch.float32)


def _stage(ctx: RunContext, reference: torch.Tensor, index: int, weights: list[torch.Tensor],
           skip_exponent: float = SKIP_EXPONENT) -> CanvasRun:  # fmt: skip
    """Stage `index` (stride 2**index): its own noise and schedule, pulled toward `reference`, views mixed in."""
    s, info = ctx.settings, ctx.backend.info
    cond = ctx.condition(s.prompt, s.negative, s.guidance)
    scheduler = prepared_scheduler(ctx)
    seed = (s.seed + index) % 2**64
    generator = seeded_generator(seed)  # each stage its own, reproducible noise
    cond = drawn(ctx, cond, generator, seed)
    first = denoising_start(scheduler, s, info)
    if ctx.resume is None:
        init = encoded_init(ctx, generator) if s.init else None
        noise = initial_noise(tuple(reference.shape), generator, s, weights, index).to(ctx.backend.device)
        latents = noised(info.scheduler_kind, scheduler, reference if init is None else init, noise, first)
    else:
        assert ctx.resume.noise is not None
        noise = ctx.resume.noise.to(ctx.backend.device)
        latents, first = resumed(ctx, scheduler, generator)
    steps = len(scheduler.timesteps)
    local = canvas_denoiser(ctx, cond, weights)
    views = dilated_views(ctx, local, 2**index)
    denoiser = CoherentDenoiser(local, views, 2**index, DILATION_EXPONENT, steps, info.latent_multiple)
    guide = SkipResidual(ctx, reference, noise, scheduler, skip_exponent, steps)
    writer = None
    if ctx.checkpoints is not None:
        writer = CheckpointWriter(ctx, scheduler, generator, index, reference, noise)
    latents = run_steps(ctx, denoiser, scheduler, generator, latents, first, writer, guide)
    pixels = local.evaluated_pixels + denoiser.views.evaluated_pixels
    return CanvasRun(latents, denoiser.model_calls, pixels, local.plan.tiles_per_step,
                     StepRange(start_index(scheduler, s, info), steps))  # fmt: skip
