"""The parameters a generated file carries, so that any output can be reproduced — and measured — from itself.

Flat keys (prompt, seed, steps, size, tile, ...) are what image viewers and people read; beside them are the
whole resolved settings (`settings`), the resolved run request when the run came through the run layer
(`request`: `gigadiff resume` and the service rebuild a run from it), the model's description (`model_info`:
its VAE factor, token size and tile rims) and which timesteps ran (`timesteps`): from these, `gigadiff metrics`
rebuilds the tile grids of the run with the function the run used (gigadiff.grids).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from gigadiff.backends.base import ModelInfo, ShiftRule
from gigadiff.grids import StepRange
from gigadiff.settings import GenerationSettings


def generation_metadata(settings: GenerationSettings, info: ModelInfo, steps: StepRange | None = None,
                        request: dict[str, Any] | None = None, vae_mode: str = "") -> dict[str, Any]:  # fmt: skip
    from gigadiff import __version__

    meta: dict[str, Any] = {
        "gigadiff_version": __version__,
        "model": info.name,
        "model_family": info.family,
        "vae_scale_factor": info.vae_scale_factor,
        "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt,
        "seed": settings.seed,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "scheduler": settings.scheduler,
        "width": settings.width,
        "height": settings.height,
        "tile": settings.tile,
        "overlap": settings.overlap,
        "weights": settings.weights,
        "shift": settings.shift,
        "level_sync": settings.level_sync,
        "coherence": settings.coherence,
        **({"tileable": settings.tileable} if settings.tileable != "none" else {}),
        **({"init_image": settings.init_image, "strength": settings.strength} if settings.init_image else {}),
        **({"mu": settings.mu, "flow_shift": settings.flow_shift} if settings.mu is not None else {}),
        **settings.extra,
        "settings": settings.to_dict(),
        "model_info": asdict(info),
    }
    if steps is not None:
        meta["timesteps"] = {"first": steps.first, "count": steps.count}
    if request is not None:
        meta["request"] = request
    if vae_mode:
        meta["vae_mode"] = vae_mode
    return meta


def info_from_metadata(meta: dict[str, Any]) -> ModelInfo:
    """The model description recorded by `generation_metadata`."""
    raw = dict(meta["model_info"])
    raw["shift_rule"] = ShiftRule(**raw.get("shift_rule", {}))
    for key in ("prediction_range",):
        if raw.get(key) is not None:
            raw[key] = tuple(raw[key])
    raw["options"] = tuple(raw.get("options", ()))
    return ModelInfo(**raw)


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
