"""The parameters a finished run records in its outputs, so that any output can be reproduced — and measured —
from itself.

Flat keys (the image options, gigadiff.options.IMAGE_OPTIONS, with the canvas size, model and timestep shift)
are what image viewers and people read; beside them are the whole resolved settings (`settings`), the resolved
run request when the run came through the run layer (`request`: `gigadiff resume` and the service rebuild a run
from it), the model's facts (`model_info`: its VAE factor, token size and tile rims) and which timesteps ran
(`timesteps`): from these, `gigadiff metrics` rebuilds the tile grids of the run with the function the run used
(gigadiff.grids).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gigadiff.facts import ModelInfo
from gigadiff.grids import StepRange
from gigadiff.options import IMAGE_OPTIONS
from gigadiff.settings import GenerationSettings


def generation_metadata(settings: GenerationSettings, info: ModelInfo, steps: StepRange | None = None,
                        request: dict[str, Any] | None = None, vae_mode: str = "",
                        notes: tuple[str, ...] = (), weights: Mapping[str, Any] | None = None,
                        ) -> dict[str, Any]:  # fmt: skip
    from gigadiff import __version__

    meta: dict[str, Any] = {
        "gigadiff_version": __version__,
        "model": info.name,
        "model_family": info.family,
        "vae_scale_factor": info.vae_scale_factor,
        "width": settings.width,
        "height": settings.height,
        **{name: getattr(settings, name) for name in IMAGE_OPTIONS},
        **({"mu": settings.mu} if settings.mu is not None else {}),
        **settings.family_options,
        "settings": settings.to_dict(),
        "model_info": info.to_dict(),
    }
    if steps is not None:
        meta["timesteps"] = {"first": steps.first, "count": steps.count}
    if request is not None:
        meta["request"] = request
    if vae_mode:
        meta["vae_mode"] = vae_mode
    if weights:
        meta["dtype"] = weights["dtype"]  # what `--dtype auto` (or the request) resolved to on the device that ran it
        meta["model_setup"] = dict(weights)  # how the weights were stored and placed, how the model ran
    if notes:
        meta["notes"] = list(notes)
    return meta
