"""A request checked against itself and against its model's facts, completed with the model's defaults, and the
settings derived from it. Torch-free: everything here runs before any weights (or torch) load.

The checks run from the cheapest to the ones that need the model's description (`ModelInfo`, read from config
files): the request's own values (`check_values` in gigadiff.options: types, choices, bounds; then the
relations between fields), what the model can do (prompt, guidance, scheduler, positions, family options),
then the geometry and the schedule once the model's defaults are in. Errors name the request field they concern
(gigadiff.errors), so every front end shows them its own way.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from gigadiff.errors import GigadiffError, Note
from gigadiff.facts import ModelInfo
from gigadiff.grids import default_tile_batch, plan_for
from gigadiff.options import FAMILY_OPTIONS, IMAGE_OPTIONS, RunRequest, check_values
from gigadiff.regions import DEFAULT_FEATHER_PX, RegionSet, check_regions, parse_regions
from gigadiff.schedulers import check_scheduler
from gigadiff.settings import GenerationSettings, wrap_axes
from gigadiff.shift import parse_flow_shift, tile_mu

MAX_SIDE = 65536
"""Largest accepted side in image pixels. Beyond this the latent canvas alone needs tens of GB."""
DEFAULT_STRENGTH = 0.8
"""As diffusers' img2img pipelines: most of the picture is repainted, its layout and colours are kept."""
_SIZE_RE = re.compile(r"^\s*(-?\d+)\s*[xX×*,]\s*(-?\d+)\s*$")


def new_seed() -> int:
    """A fresh random seed for runs that did not ask for one (it is recorded in the output's metadata)."""
    return secrets.randbits(32)


def parse_size(text: str) -> tuple[int, int]:
    """Parse "WIDTHxHEIGHT" (or a single number for a square) into (width, height), checked for range."""
    m = _SIZE_RE.match(text)
    if m:
        width, height = int(m.group(1)), int(m.group(2))
    elif text.strip().lstrip("-").isdigit():
        width = height = int(text)
    else:
        raise GigadiffError(f"{{size}} {text!r} is not of the form WIDTHxHEIGHT, e.g. 4096x2048", "size")
    for name, value in (("width", width), ("height", height)):
        if value <= 0:
            raise GigadiffError(f"{{size}}: {name} must be positive, got {value}", "size")
        if value > MAX_SIDE:
            raise GigadiffError(f"{{size}}: {name} {value} is larger than the supported maximum of {MAX_SIDE} pixels",
                                "size")  # fmt: skip
    return width, height


def parse_sigmas(text: str) -> tuple[float, ...]:
    """Parse "80,2.5,0.5" into a tuple of noise levels, positive and decreasing."""
    try:
        sigmas = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise GigadiffError(f"{{sigmas}} {text!r} must be comma-separated numbers, e.g. 80,2.5", "sigmas") from None
    if not sigmas or any(not v > 0 for v in sigmas) or list(sigmas) != sorted(sigmas, reverse=True):
        raise GigadiffError(f"{{sigmas}} must be positive and decreasing, got {list(sigmas)}", "sigmas")
    return sigmas


def check_relations(r: RunRequest) -> None:
    """The request's values against each other, after each against its own option (gigadiff.options)."""
    check_values(r)
    check_scheduler(r.scheduler)
    if r.size is not None:
        parse_size(r.size)
    if r.strength is not None and r.init is None:
        raise GigadiffError("{strength} applies to an init image; give {init} IMAGE (or use gigadiff upscale)",
                            "strength", "init")  # fmt: skip
    if r.tile is not None and r.overlap is not None and r.overlap >= r.tile:
        raise GigadiffError(f"{{overlap}} ({r.overlap}px) must be smaller than the {{tile}} ({r.tile}px)",
                            "overlap", "tile")  # fmt: skip
    if r.sigmas is not None:
        sigmas = parse_sigmas(r.sigmas)
        if r.steps is not None and r.steps != len(sigmas):
            raise GigadiffError(f"{len(sigmas)} {{sigmas}} given but {{steps}} is {r.steps}; give one or the other",
                                "sigmas", "steps")  # fmt: skip
    parse_flow_shift(r.flow_shift)


def check_capabilities(r: RunRequest, info: ModelInfo, regions: RegionSet | None) -> None:
    """What the request asks of the model against what the model can do."""
    name = info.name
    if r.init is not None and not info.can_encode:  # first: upscale's default negative prompt is not the reason
        raise GigadiffError(f"model {name!r} cannot encode images, so it cannot upscale or start from an image "
                            "({init})", "init")  # fmt: skip
    given = [f for f in ("prompt", "negative") if getattr(r, f)]
    if given and not info.takes_prompt:
        named = " and ".join(f"{{{f}}}" for f in given)
        raise GigadiffError(f"model {name!r} takes no prompt: remove {named}", *given)
    if r.guidance is not None and not info.uses_guidance:
        raise GigadiffError(f"model {name!r} takes no guidance scale; remove {{guidance}}", "guidance")
    if r.true_cfg is not None and r.true_cfg > 1 and not info.true_cfg:
        what = "its guidance is classifier-free already: use {guidance}" if info.guidance_kind == "cfg" else "none"
        raise GigadiffError(f"{{true_cfg}} is for models whose guidance is embedded (FLUX.1); model {name!r} has "
                            f"{what}", "true_cfg", "guidance")  # fmt: skip
    check_scheduler(r.scheduler, info.scheduler_kind, name)
    if r.dtype == "fp16" and info.fp16_risk and not r.allow_fp16:
        raise GigadiffError(f"{{dtype}} fp16: {info.fp16_risk}, so its images would come out black or broken; use "
                            "bf16 (or fp32), or pass {allow_fp16} to run it in fp16 anyway", "dtype",
                            "allow_fp16")  # fmt: skip
    if r.dtype in ("fp16", "bf16") and info.gpu_dtype == "fp32":
        raise GigadiffError(f"model {name!r} runs in fp32 only; use {{dtype}} fp32 or auto", "dtype")
    if not info.diffusers_weights:
        plain = (("quantize", "none"), ("quantize_text", "none"), ("transformer", None), ("compile", False),
                 ("attention", "auto"), ("lora", None))  # fmt: skip
        chosen = [f for f, default in plain if getattr(r, f) != default]
        if r.offload not in ("auto", "none"):
            chosen.append("offload")
        if chosen:
            named = ", ".join(f"{{{f}}}" for f in chosen)
            raise GigadiffError(f"model {name!r} is not a diffusers model: {named} do not apply to it", *chosen)
    if r.control and info.controlnet_class is None:
        raise GigadiffError(f"{{control}}: ControlNets run per tile on SD, SDXL, SD3, FLUX.1, Qwen-Image, "
                            f"SANA and Z-Image so far; model {name!r} is a {info.family} model", "control")  # fmt: skip
    if r.guess_mode and not r.control:
        raise GigadiffError("{guess_mode} changes how ControlNets act: give a {control}", "guess_mode", "control")
    if r.guess_mode and info.controlnet_class != "ControlNetModel":
        raise GigadiffError(f"{{guess_mode}} is SD's and SDXL's ControlNet pipelines' option; model {name!r}'s "
                            "pipeline has none", "guess_mode")  # fmt: skip
    if r.control:
        from gigadiff.backends.control import check_controlnet_class, parse_control

        for spec in dict.fromkeys(parse_control(text) for text in r.control):
            check_controlnet_class(spec.model, info, spec.mode)
    if r.lora and info.diffusers_weights and not info.loras:
        raise GigadiffError(f"model {name!r} takes no LoRAs: its diffusers pipeline has no LoRA loader", "lora")
    if r.attention != "auto" and info.diffusers_weights and not info.attention_backends:
        raise GigadiffError(f"{{attention}}: model {name!r}'s attention calls PyTorch's directly, not through "
                            "diffusers' attention backends (they serve the FLUX, Z-Image and Qwen-Image "
                            "transformers); remove {attention}", "attention")  # fmt: skip
    if regions and not info.takes_prompt:
        raise GigadiffError(f"model {name!r} takes no prompt, so it cannot take {{regions}}", "regions")
    if r.flow_shift != "tile" and info.scheduler_kind != "flow":
        raise GigadiffError(f"{{flow_shift}} applies to flow-matching models; model {name!r} is not one",
                            "flow_shift")  # fmt: skip
    if r.positions == "global" and info.positions == "none":
        raise GigadiffError(f"model {name!r} has no position ids (a convolutional UNet): {{positions}} global "
                            "does not apply", "positions")  # fmt: skip
    unknown = [o for o in FAMILY_OPTIONS if getattr(r, o) is not None and o not in info.options]
    if unknown:
        accepted = ", ".join(info.options) or "none"
        raise GigadiffError(f"model {name!r} does not accept {', '.join(unknown)} (it accepts: {accepted})",
                            *unknown)  # fmt: skip


def with_model_defaults(r: RunRequest, info: ModelInfo, width: int | None, height: int | None) -> RunRequest:
    """The request with what the user left open filled in from the model's own defaults (and a new seed)."""
    tile = r.tile if r.tile is not None else info.native_size
    factor, unit = info.vae_scale_factor, info.size_multiple
    share = round(tile * info.default_overlap_share)
    default_overlap = max(share, 4 * info.edge_margin * factor) // unit * unit
    steps = len(parse_sigmas(r.sigmas)) if r.sigmas else r.steps
    side = info.default_size or 2 * info.native_size
    guidance = (r.guidance if r.guidance is not None else info.default_guidance) if info.uses_guidance else None
    return r.replace(
        size=f"{width or side}x{height or side}",
        seed=r.seed if r.seed is not None else new_seed(),
        steps=steps if steps is not None else info.default_steps,
        guidance=guidance,
        tile=tile,
        weights=r.weights or info.default_weights,
        level_sync=r.level_sync if r.level_sync is not None else info.default_level_sync,
        overlap=r.overlap if r.overlap is not None else default_overlap,
        strength=r.strength if r.strength is not None or r.init is None else DEFAULT_STRENGTH,
    )


def _multiple(name: str, value: int, unit: int, info: ModelInfo, field: str) -> None:
    if value % unit == 0:
        return
    why = "this model's VAE downsampling factor"
    if info.latent_multiple > 1:
        why = f"its VAE factor {info.vae_scale_factor} x {info.latent_multiple}x{info.latent_multiple} token patches"
    lower, upper = value // unit * unit, (value // unit + 1) * unit
    use = f"use {lower or upper} or {upper}"
    raise GigadiffError(f"{{{field}}}: {name} {value} is not a multiple of {unit} ({why}); {use}", field)


def check_geometry(r: RunRequest, info: ModelInfo, width: int, height: int) -> None:
    """Canvas, tile and overlap of a request with the model's defaults in, against the model's token, tile
    size, rims and position table."""
    assert r.tile is not None and r.overlap is not None
    name, unit = info.name, info.size_multiple
    _multiple("width", width, unit, info, "size")
    _multiple("height", height, unit, info, "size")
    if r.tile % unit or r.overlap % unit:
        raise GigadiffError(
            f"{{tile}} ({r.tile}px) and {{overlap}} ({r.overlap}px) must be multiples of {unit} "
            + ("(this model's VAE downsampling factor)" if unit == info.vae_scale_factor
               else f"(model {name!r}'s token size in pixels)"),
            "tile", "overlap",
        )  # fmt: skip
    if r.tile < 2 * unit:
        raise GigadiffError(f"{{tile}} ({r.tile}px) must be at least {2 * unit}px", "tile")
    if r.overlap >= r.tile:
        raise GigadiffError(f"{{overlap}} ({r.overlap}px) must be smaller than the {{tile}} ({r.tile}px)",
                            "overlap", "tile")  # fmt: skip
    if info.fixed_tile:
        n = info.native_size
        if r.tile != n:
            raise GigadiffError(f"model {name!r} only takes {n}x{n} tiles; remove {{tile}} or set it to {n}", "tile")
        if min(width, height) < n:
            raise GigadiffError(f"{{size}} {width}x{height} is smaller than model {name!r}'s {n}x{n} input", "size")
    if r.positions == "global" and info.max_global_px and max(width, height) > info.max_global_px:
        raise GigadiffError(
            f"{{positions}} global: model {name!r}'s position table covers {info.max_global_px}px a side, the canvas "
            f"is {width}x{height}; use {{positions}} local (any size) or a smaller {{size}}",
            "positions", "size",
        )  # fmt: skip
    if r.positions == "global" and r.control:
        from gigadiff.backends.control import check_controlnet_table, parse_control

        for model in dict.fromkeys(parse_control(text).model for text in r.control):
            check_controlnet_table(model, info, width, height)
    rim = info.edge_margin * info.vae_scale_factor
    if rim and r.overlap < 2 * rim and r.tile < max(width, height):
        raise GigadiffError(
            f"{{overlap}} ({r.overlap}px) must be at least {2 * rim}px for model {name!r}: its output is "
            f"unreliable within {rim}px of a tile edge, so neighbouring tiles must cover each other's rims",
            "overlap",
        )


def check_schedule(r: RunRequest, info: ModelInfo) -> None:
    """Steps (and img2img's share of them) against what the model's scheduler can run."""
    assert r.steps is not None
    if r.steps < info.min_steps:
        raise GigadiffError(f"{{steps}} {r.steps}: model {info.name!r} needs at least {info.min_steps} steps (its "
                            "scheduler stretches the schedule to a terminal noise level)", "steps")  # fmt: skip
    if r.init is not None and r.strength is not None and info.skipped_steps(r.steps, r.strength) >= r.steps:
        raise GigadiffError(
            f"{{strength}} {r.strength} of {r.steps} {{steps}} leaves no step to run (steps x strength must be at "
            "least 1); raise {strength} or {steps}",
            "strength", "steps",
        )  # fmt: skip


def resolved_coherence(r: RunRequest, info: ModelInfo, width: int, height: int) -> str:
    """Resolve "auto" and check an explicit "progressive" against the run (raises GigadiffError)."""
    beyond = max(width, height) > 2 * info.native_size
    stages = min(width, height) > info.native_size
    if r.coherence == "auto":  # a ControlNet gives the composition itself, at the final size
        usable = info.can_encode and r.init is None and not r.control
        return "progressive" if beyond and stages and usable else "none"
    if r.coherence == "progressive":
        reason = None
        if not info.can_encode:
            reason = f"model {info.name!r} cannot encode images (stages are decoded, enlarged and encoded again)"
        elif r.control:
            reason = "ControlNets hold each tile to its crop of the control image at the final size"
        elif not stages:
            reason = f"the shorter side must exceed the model's native size ({info.native_size}px) to have stages"
        if reason:
            raise GigadiffError(f"{{coherence}} progressive cannot be used here: {reason}", "coherence")
    return r.coherence


def notes(r: RunRequest, info: ModelInfo) -> tuple[Note, ...]:
    """What a resolved request should know about how the run follows its model's pipeline."""
    scale = info.cfg_scale(r.guidance, r.true_cfg)
    if scale is not None and scale > info.cfg_above and info.negative_required and not r.negative:
        option = "guidance" if info.guidance_kind == "cfg" else "true_cfg"
        return (Note(f"model {info.name!r} runs classifier-free guidance ({{{option}}} {scale:g}) only with a negative "
                     "prompt, as its pipeline does: none was given, so it is off (one pass per tile); give {negative} "
                     "to use it", (option, "negative")),)  # fmt: skip
    return ()


def settings_for(request: RunRequest, info: ModelInfo, regions: RegionSet | None = None,
                 size: tuple[int, int] | None = None) -> tuple[RunRequest, GenerationSettings]:  # fmt: skip
    """Check `request` against `info`, fill in every default, and derive the settings: (the resolved request,
    its settings). `regions`: the request's regions, parsed (by default parsed here from data, no files);
    `size`: (width, height) where the caller found it elsewhere (an init image's size)."""
    if regions is None and request.regions is not None:
        regions = parse_regions(request.regions, "regions")
    if regions is not None:
        background = regions.background
        request = request.replace(prompt=request.prompt or background.get("prompt", ""),
                                  negative=request.negative or background.get("negative_prompt", ""))  # fmt: skip
    check_relations(request)
    check_capabilities(request, info, regions)
    width, height = size or (parse_size(request.size) if request.size is not None else (None, None))
    r = with_model_defaults(request, info, width, height)
    check_relations(r)
    width, height = parse_size(str(r.size))
    check_geometry(r, info, width, height)
    check_schedule(r, info)
    if r.cfg_split and not info.runs_cfg(info.cfg_scale(r.guidance, r.true_cfg), r.negative):
        raise GigadiffError("{cfg_split} shares classifier-free guidance's two passes between processes; this run "
                            f"makes one pass per tile (model {info.name!r} with {{guidance}} {r.guidance}): remove "
                            "{cfg_split}", "cfg_split", "guidance")  # fmt: skip
    r = r.replace(coherence=resolved_coherence(r, info, width, height))
    if r.level_sync and regions:
        raise GigadiffError("{level_sync} cannot be used with regional prompts yet (its probe measures the "
                            "background prompt's response alone); turn {level_sync} off", "level_sync")  # fmt: skip
    if regions:
        check_regions(regions.regions, width, height)
    if r.tile_batch is None:
        assert r.tile is not None and r.overlap is not None and r.seed is not None
        plan = plan_for(height, width, r.tile, r.overlap, r.shift, r.seed, wrap_axes(r.tileable), info)
        r = r.replace(tile_batch=default_tile_batch(plan.tiles_per_step))
    assert r.tile is not None and r.steps is not None
    derived: dict[str, Any] = {
        "width": width,
        "height": height,
        "sigmas": parse_sigmas(r.sigmas) if r.sigmas else None,
        "regions": regions.regions if regions else (),
        "region_feather": regions.feather if regions else DEFAULT_FEATHER_PX,
        "mu": tile_mu(info, r.flow_shift, r.tile, height, width, r.steps),
        "family_options": {o: getattr(r, o) for o in FAMILY_OPTIONS if getattr(r, o) is not None},
    }
    return r, GenerationSettings(**{name: getattr(r, name) for name in IMAGE_OPTIONS}, **derived)
