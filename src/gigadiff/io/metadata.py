"""The parameters a generated file carries, so that any output can be reproduced from itself."""

from __future__ import annotations

import json
from typing import Any

from gigadiff.backends.base import ModelInfo
from gigadiff.settings import GenerationSettings


def generation_metadata(settings: GenerationSettings, info: ModelInfo) -> dict[str, Any]:
    from gigadiff import __version__

    return {
        "gigadiff_version": __version__,
        "model": info.name,
        "model_family": info.family,
        "vae_scale_factor": info.vae_scale_factor,
        "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt,
        "seed": settings.seed,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "guidance_rescale": settings.guidance_rescale,
        "scheduler": settings.scheduler,
        "width": settings.width,
        "height": settings.height,
        "tile": settings.tile,
        "overlap": settings.overlap,
        "weights": settings.weights,
        "shift": settings.shift,
        "level_sync": settings.level_sync,
        "tile_batch": settings.tile_batch,
        "eta": settings.eta,
        "coherence": settings.coherence,
        **(
            {"skip_exponent": settings.skip_exponent, "dilation_exponent": settings.dilation_exponent}
            if settings.coherence == "progressive"
            else {}
        ),
        **({"tileable": settings.tileable} if settings.tileable != "none" else {}),
        **({"regions": list(settings.regions), "region_feather": settings.region_feather} if settings.regions else {}),
        **({"init_image": settings.init_image, "strength": settings.strength} if settings.init_image else {}),
        **({"sigmas": list(settings.sigmas)} if settings.sigmas else {}),
        **settings.extra,
    }


def parameters_text(meta: dict[str, Any]) -> str:
    """A one-paragraph summary in the style image viewers and web UIs already show ("parameters" chunk)."""
    lines = [meta["prompt"]]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    lines.append(
        f"Steps: {meta['steps']}, Sampler: {meta['scheduler']}, CFG scale: {meta['guidance']}, "
        f"Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, Model: {meta['model']}, "
        f"Tile: {meta['tile']}, Overlap: {meta['overlap']}, Weights: {meta['weights']}, "
        f"Shift: {meta['shift']}, Version: gigadiff {meta['gigadiff_version']}"
    )
    return "\n".join(lines)


def to_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, indent=2, sort_keys=True)
