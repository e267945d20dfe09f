"""Regional prompts as denoiser layers: one conditioning and one weight map per region, plus the background.

The background's conditioning is the run's own prompt; see gigadiff.regions for the format and the weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gigadiff.noise import canvas_noise, seeded_generator
from gigadiff.recipes.context import RunContext
from gigadiff.regions import BACKGROUND_FLOOR, background_weight, region_weight
from gigadiff.sampler import Layer
from gigadiff.settings import GenerationSettings


def region_weights(
    settings: GenerationSettings, factor: int, size: tuple[int, int] | None = None
) -> list[torch.Tensor]:
    """Every region's feathered weight on the canvas (CPU), in the order of `settings.regions`; with `size`
    (h, w: a progressive stage's canvas) area-averaged from the full canvas down to that size."""
    weights = [
        region_weight(r, settings.width, settings.height, factor, settings.region_feather) for r in settings.regions
    ]
    if size is None:
        return weights
    return [w if tuple(w.shape) == size else F.interpolate(w[None, None], size=size, mode="area")[0, 0]
            for w in weights]  # fmt: skip


def region_layers(ctx: RunContext, background_cond: Any, weights: list[torch.Tensor]) -> list[Layer]:
    """The background layer (weights: what the regions leave) followed by one layer per region (`background_cond`
    has drawn what it draws: the regions share it)."""
    weights = [w.to(ctx.backend.device) for w in weights]
    layers = [Layer(background_cond, background_weight(weights), skip_below=1.5 * BACKGROUND_FLOOR)]
    for region, weight in zip(ctx.settings.regions, weights, strict=True):
        guidance = region.guidance if region.guidance is not None else ctx.settings.guidance
        cond = ctx.condition(region.prompt, region.negative_prompt, guidance)
        layers.append(Layer(ctx.backend.drawn_like(cond, background_cond), weight))  # one encoded control image
    return layers


def with_region_seeds(noise: torch.Tensor, settings: GenerationSettings, weights: list[torch.Tensor],
                      offset: int = 0) -> torch.Tensor:  # fmt: skip
    """The initial noise, redrawn from a region's own seed (+ offset) where that region (of `weights`) dominates."""
    out = noise
    for region, weight in zip(settings.regions, weights, strict=True):
        if region.seed is None:
            continue
        own = canvas_noise(tuple(noise.shape), seeded_generator((region.seed + offset) % 2**64), noise.device)
        out = torch.where((weight > 0.5).to(noise.device), own, out)
    return out
