"""What determines a generated image, and the checks that run before any model is loaded.

Sizes here are in image pixels, as users think of them; the recipes convert to canvas pixels with the model's
VAE factor. `check_generic` needs nothing but the numbers; `check_for_model` runs against the model's
`ModelInfo`, read from its config files before its weights (or torch) load, and fills in every default.
Errors name the request field they concern (gigadiff.errors).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gigadiff.backends.base import ModelInfo
from gigadiff.backends.flow import parse_flow_shift, run_mu
from gigadiff.errors import GigadiffError
from gigadiff.regions import Region
from gigadiff.schedulers import check_scheduler
from gigadiff.windows import WEIGHT_KINDS

MAX_SIDE = 65536
"""Largest accepted side in image pixels. Beyond this the latent canvas alone needs tens of GB."""

MAX_STEPS = 1000
TILEABLE = ("none", "x", "y", "both")
COHERENCE = ("auto", "progressive", "none")
POSITIONS = ("local", "global")
DEFAULT_TILE_BATCH = 4
"""Tiles per model call unless asked otherwise (fewer when a step has fewer tiles)."""
DEFAULT_STRENGTH = 0.8
"""As diffusers' img2img pipelines: most of the picture is repainted, its layout and colours are kept."""
_SIZE_RE = re.compile(r"^\s*(-?\d+)\s*[xX×*,]\s*(-?\d+)\s*$")


def wrap_axes(tileable: str | None) -> tuple[bool, bool]:
    """(vertical, horizontal): the axes on which a `tileable` ("both", "x", "y", "none") image continues."""
    return tileable in ("y", "both"), tileable in ("x", "both")


def new_seed() -> int:
    """A fresh random seed for runs that did not ask for one (it is recorded in the output's metadata)."""
    return secrets.randbits(32)


def parse_size(text: str) -> tuple[int, int]:
    """Parse "WIDTHxHEIGHT" (or a single number for a square) into (width, height)."""
    m = _SIZE_RE.match(text)
    if m:
        width, height = int(m.group(1)), int(m.group(2))
    elif text.strip().lstrip("-").isdigit():
        width = height = int(text)
    else:
        raise GigadiffError(f"{{size}} {text!r} is not of the form WIDTHxHEIGHT, e.g. 4096x2048", "size")
    return width, height


def parse_sigmas(text: str) -> tuple[float, ...]:
    """Parse "80,2.5,0.5" into a tuple of noise levels (checked for order in `check_generic`)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise GigadiffError(f"{{sigmas}} {text!r} must be comma-separated numbers, e.g. 80,2.5", "sigmas") from None


@dataclass(frozen=True)
class GenerationSettings:
    """Every setting that determines a generated image; embedded in the output's metadata."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    """Image width in pixels; None means the model's default size (twice its native size for most)."""
    height: int | None = None
    steps: int | None = None
    """None means the model's default (e.g. 30, or 4 for SDXL-Turbo)."""
    guidance: float | None = None
    true_cfg: float | None = None
    """True classifier-free guidance beside a model's embedded guidance (FLUX.1); None or 1: off."""
    seed: int = 0
    scheduler: str = "default"
    tile: int | None = None
    """Tile side in image pixels; None means the model's native size."""
    overlap: int | None = None
    """Minimum overlap between neighbouring tiles in image pixels; None means the model's default share of the
    tile (1/8 for most models, 1/2 for terrain)."""
    weights: str | None = None
    shift: bool = True
    level_sync: bool | None = None
    """Tiles agree on the canvas's low frequencies (gigadiff.levels); None means the model's default."""
    tile_batch: int | None = None
    """None: DEFAULT_TILE_BATCH, or the tiles of a step when there are fewer."""
    guidance_rescale: float = 0.0
    eta: float = 0.0
    sigmas: tuple[float, ...] | None = None
    """An explicit noise-level schedule (decreasing); replaces the scheduler's own spacing, and sets steps."""
    init_image: str | None = None
    """img2img / upscaling: the picture to start from (resized to the canvas, encoded by the tiled VAE)."""
    strength: float | None = None
    """How much of the init image is repainted: 1 = all of it (pure noise), 0 = none; None = 0.8 with an image."""
    regions: tuple[Region, ...] = ()
    """Regional prompts (gigadiff.regions); the prompt is then the background's."""
    region_feather: int = 32
    """Image pixels over which region edges inside the canvas fade (see gigadiff.regions)."""
    coherence: str = "auto"
    """"progressive" (stages x2 from the native size, see recipes.coherence), "none", or "auto": progressive
    for text-to-image beyond twice the model's native size."""
    skip_exponent: float = 3.0
    """Progressive coherence: exponent of the skip residual's cosine fade (higher: the earlier stage lets go sooner)."""
    dilation_exponent: float = 1.0
    """Progressive coherence: exponent of the dilated global views' cosine fade."""
    tileable: str = "none"
    """Seamless output: "both" (a texture), "x" (left/right continue: 360-degree panoramas), "y", or "none"."""
    flow_shift: str = "tile"
    """Flow models' timestep shift: "tile", "canvas", a shift or "mu=X" (gigadiff.backends.flow)."""
    mu: float | None = None
    """The timestep shift the run uses (resolved from flow_shift; None: a fixed-shift or non-flow model's own)."""
    positions: str = "local"
    """DiT position ids per tile: "local" (from 0, as trained) or "global" (canvas coordinates)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Backend-specific settings (e.g. terrain difficulty), kept for metadata."""

    @property
    def wrap(self) -> tuple[bool, bool]:
        return wrap_axes(self.tileable)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSettings:
        """Settings recorded by `to_dict` (checkpoints, metadata)."""
        sigmas = data.get("sigmas")
        regions = tuple(Region.from_dict(r) for r in data.get("regions") or ())
        return cls(**{**data, "sigmas": tuple(sigmas) if sigmas is not None else None, "regions": regions})

    @property
    def conditioning_options(self) -> dict[str, Any]:
        """What a backend's `condition` may read beside the prompt: guidance details, positions, family options."""
        return {"guidance_rescale": self.guidance_rescale, "true_cfg": self.true_cfg, "positions": self.positions,
                **self.extra}  # fmt: skip

    def with_model_defaults(self, info: ModelInfo) -> GenerationSettings:
        """Fill in what the user left open from the model's own defaults."""
        tile = self.tile if self.tile is not None else info.native_size
        factor, unit = info.vae_scale_factor, info.size_multiple
        share = round(tile * info.default_overlap_share)
        default_overlap = max(share, 4 * info.edge_margin * factor) // unit * unit
        steps = len(self.sigmas) if self.sigmas else self.steps
        side = info.default_size or 2 * info.native_size
        return replace(
            self,
            width=self.width if self.width is not None else side,
            height=self.height if self.height is not None else side,
            steps=steps if steps is not None else info.default_steps,
            guidance=(self.guidance if self.guidance is not None else info.default_guidance)
            if info.uses_guidance
            else None,
            tile=tile,
            weights=self.weights or info.default_weights,
            level_sync=self.level_sync if self.level_sync is not None else info.default_level_sync,
            overlap=self.overlap if self.overlap is not None else default_overlap,
            strength=self.strength if self.strength is not None or self.init_image is None else DEFAULT_STRENGTH,
        )


def check_generic(s: GenerationSettings) -> None:
    """Checks that need no model: raise GigadiffError with a specific message on the first problem."""
    for name, value in (("width", s.width), ("height", s.height)):
        if value is None:
            continue
        if value <= 0:
            raise GigadiffError(f"{{size}}: {name} must be positive, got {value}", "size")
        if value > MAX_SIDE:
            raise GigadiffError(f"{{size}}: {name} {value} is larger than the supported maximum of {MAX_SIDE} pixels",
                                "size")  # fmt: skip
    if s.steps is not None and not 1 <= s.steps <= MAX_STEPS:
        raise GigadiffError(f"{{steps}} must be between 1 and {MAX_STEPS}, got {s.steps}", "steps")
    if s.guidance is not None and s.guidance < 0:
        raise GigadiffError(f"{{guidance}} must be >= 0, got {s.guidance}", "guidance")
    if s.true_cfg is not None and not s.true_cfg >= 1:
        raise GigadiffError(f"{{true_cfg}} must be at least 1 (1: off), got {s.true_cfg}", "true_cfg")
    if not 0 <= s.guidance_rescale <= 1:
        raise GigadiffError(f"{{guidance_rescale}} must lie in [0, 1], got {s.guidance_rescale}", "guidance_rescale")
    if not 0 <= s.eta <= 1:
        raise GigadiffError(f"{{eta}} must lie in [0, 1], got {s.eta}", "eta")
    if s.tile_batch is not None and s.tile_batch < 1:
        raise GigadiffError(f"{{tile_batch}} must be at least 1, got {s.tile_batch}", "tile_batch")
    if not 0 <= s.seed < 2**64:
        raise GigadiffError(f"{{seed}} must lie in [0, 2**64), got {s.seed}", "seed")
    check_scheduler(s.scheduler)
    if s.strength is not None:
        if s.init_image is None:
            raise GigadiffError("{strength} applies to an init image; give {init} IMAGE (or use gigadiff upscale)",
                                "strength", "init")  # fmt: skip
        if not 0 < s.strength <= 1:
            raise GigadiffError(f"{{strength}} must lie in (0, 1], got {s.strength}", "strength")
    for name, value, allowed in (("coherence", s.coherence, COHERENCE), ("tileable", s.tileable, TILEABLE),
                                 ("positions", s.positions, POSITIONS)):  # fmt: skip
        if value not in allowed:
            raise GigadiffError(f"{{{name}}} must be one of {', '.join(allowed)}, got {value!r}", name)
    if not (s.skip_exponent > 0 and s.dilation_exponent > 0):
        raise GigadiffError("coherence exponents must be positive")
    if s.weights is not None and s.weights not in WEIGHT_KINDS:
        raise GigadiffError(f"unknown {{weights}} {s.weights!r}; choose one of: {', '.join(WEIGHT_KINDS)}", "weights")
    if s.tile is not None and s.tile <= 0:
        raise GigadiffError(f"{{tile}} must be positive, got {s.tile}", "tile")
    if s.overlap is not None and s.overlap < 0:
        raise GigadiffError(f"{{overlap}} must be >= 0, got {s.overlap}", "overlap")
    if s.tile is not None and s.overlap is not None and s.overlap >= s.tile:
        raise GigadiffError(f"{{overlap}} ({s.overlap}px) must be smaller than the {{tile}} ({s.tile}px)",
                            "overlap", "tile")  # fmt: skip
    if s.sigmas is not None:
        if not s.sigmas or any(v <= 0 for v in s.sigmas) or list(s.sigmas) != sorted(s.sigmas, reverse=True):
            raise GigadiffError(f"{{sigmas}} must be positive and decreasing, got {list(s.sigmas)}", "sigmas")
        if s.steps is not None and s.steps != len(s.sigmas):
            raise GigadiffError(f"{len(s.sigmas)} {{sigmas}} given but {{steps}} is {s.steps}; give one or the other",
                                "sigmas", "steps")  # fmt: skip
    parse_flow_shift(s.flow_shift)


def _multiple(name: str, value: int, unit: int, info: ModelInfo, field: str) -> None:
    if value % unit == 0:
        return
    why = "this model's VAE downsampling factor"
    if info.latent_multiple > 1:
        why = f"its VAE factor {info.vae_scale_factor} x {info.latent_multiple}x{info.latent_multiple} token patches"
    lower, upper = value // unit * unit, (value // unit + 1) * unit
    use = f"use {lower or upper} or {upper}"
    raise GigadiffError(f"{{{field}}}: {name} {value} is not a multiple of {unit} ({why}); {use}", field)


def check_for_model(s: GenerationSettings, info: ModelInfo) -> GenerationSettings:
    """Checks that need the model's description; returns the settings with every default filled in."""
    check_generic(s)
    name = info.name
    if (s.prompt or s.negative_prompt) and not info.takes_prompt:
        raise GigadiffError(f"model {name!r} takes no prompt; remove the {{prompt}} and {{negative}}", "prompt",
                            "negative")  # fmt: skip
    if s.guidance is not None and not info.uses_guidance:
        raise GigadiffError(f"model {name!r} takes no guidance scale; remove {{guidance}}", "guidance")
    if s.true_cfg is not None and s.true_cfg > 1 and not info.true_cfg:
        what = "its guidance is classifier-free already: use {guidance}" if info.guidance_kind == "cfg" else "none"
        raise GigadiffError(f"{{true_cfg}} is for models whose guidance is embedded (FLUX.1); model {name!r} has "
                            f"{what}", "true_cfg", "guidance")  # fmt: skip
    check_scheduler(s.scheduler, info.scheduler_kind, name)
    if s.init_image is not None and not info.can_encode:
        raise GigadiffError(f"model {name!r} cannot encode images, so it cannot start from an {{init}} image", "init")
    if s.regions and not info.takes_prompt:
        raise GigadiffError(f"model {name!r} takes no prompt, so it cannot take {{regions}}", "regions")
    if s.flow_shift != "tile" and info.scheduler_kind != "flow":
        raise GigadiffError(f"{{flow_shift}} applies to flow-matching models; model {name!r} is not one",
                            "flow_shift")  # fmt: skip
    if s.positions == "global" and info.positions == "none":
        raise GigadiffError(f"model {name!r} has no position ids (a convolutional UNet): {{positions}} global "
                            "does not apply", "positions")  # fmt: skip
    unknown = sorted(set(s.extra) - set(info.options))
    if unknown:
        accepted = ", ".join(info.options) or "none"
        raise GigadiffError(f"model {name!r} does not accept {', '.join(unknown)} (it accepts: {accepted})",
                            *unknown)  # fmt: skip
    f, unit = info.vae_scale_factor, info.size_multiple
    resolved = s.with_model_defaults(info)
    check_generic(resolved)
    assert resolved.width is not None and resolved.height is not None and resolved.steps is not None
    assert resolved.tile is not None and resolved.overlap is not None
    _multiple("width", resolved.width, unit, info, "size")
    _multiple("height", resolved.height, unit, info, "size")
    if resolved.tile % unit or resolved.overlap % unit:
        raise GigadiffError(
            f"{{tile}} ({resolved.tile}px) and {{overlap}} ({resolved.overlap}px) must be multiples of {unit} "
            + ("(this model's VAE downsampling factor)" if unit == f else f"(model {name!r}'s token size in pixels)"),
            "tile", "overlap",
        )  # fmt: skip
    if resolved.tile < 2 * unit:
        raise GigadiffError(f"{{tile}} ({resolved.tile}px) must be at least {2 * unit}px", "tile")
    if resolved.overlap >= resolved.tile:
        raise GigadiffError(f"{{overlap}} ({resolved.overlap}px) must be smaller than the {{tile}} ({resolved.tile}px)",
                            "overlap", "tile")  # fmt: skip
    if info.fixed_tile:
        n = info.native_size
        if resolved.tile != n:
            raise GigadiffError(f"model {name!r} only takes {n}x{n} tiles; remove {{tile}} or set it to {n}", "tile")
        if min(resolved.width, resolved.height) < n:
            raise GigadiffError(
                f"{{size}} {resolved.width}x{resolved.height} is smaller than model {name!r}'s {n}x{n} input", "size"
            )
    if resolved.steps < info.min_steps:
        raise GigadiffError(f"{{steps}} {resolved.steps}: model {name!r} needs at least {info.min_steps} steps (its "
                            "scheduler stretches the schedule to a terminal noise level)", "steps")  # fmt: skip
    if (
        resolved.positions == "global"
        and info.max_global_px
        and max(resolved.width, resolved.height) > info.max_global_px
    ):
        raise GigadiffError(
            f"{{positions}} global: model {name!r}'s position table covers {info.max_global_px}px a side, the canvas "
            f"is {resolved.width}x{resolved.height}; use {{positions}} local (any size) or a smaller {{size}}",
            "positions", "size",
        )  # fmt: skip
    if (
        resolved.init_image is not None
        and resolved.strength is not None
        and int(resolved.steps * resolved.strength) < 1
    ):
        raise GigadiffError(
            f"{{strength}} {resolved.strength} of {resolved.steps} {{steps}} leaves no step to run "
            "(steps x strength must be at least 1); raise {strength} or {steps}",
            "strength",
            "steps",
        )
    resolved = replace(resolved, coherence=_coherence(resolved, info), mu=_mu(resolved, info))
    if resolved.level_sync and resolved.regions:
        raise GigadiffError(
            "{level_sync} cannot be used with regional prompts yet (its probe measures the background prompt's "
            "response alone); turn {level_sync} off",
            "level_sync",
        )
    if resolved.regions:
        from gigadiff.regions import check_regions

        check_regions(resolved.regions, resolved.width, resolved.height)
    rim = info.edge_margin * f
    if rim and resolved.overlap < 2 * rim and resolved.tile < max(resolved.width, resolved.height):
        raise GigadiffError(
            f"{{overlap}} ({resolved.overlap}px) must be at least {2 * rim}px for model {name!r}: its output is "
            f"unreliable within {rim}px of a tile edge, so neighbouring tiles must cover each other's rims",
            "overlap",
        )
    from gigadiff.grids import tile_batch  # grids builds on these settings

    return replace(resolved, tile_batch=tile_batch(resolved, info))


def _mu(s: GenerationSettings, info: ModelInfo) -> float | None:
    """The run's timestep shift, from the tokens of one tile (or as `flow_shift` says); None for other models."""
    if info.scheduler_kind != "flow":
        return None
    assert s.width and s.height and s.tile and s.steps
    token = info.size_multiple
    tile_tokens = (min(s.tile, s.height) // token) * (min(s.tile, s.width) // token)
    return run_mu(info.shift_rule, s.flow_shift, tile_tokens, (s.height // token) * (s.width // token), s.steps)


def _coherence(s: GenerationSettings, info: ModelInfo) -> str:
    """Resolve "auto" and check an explicit "progressive" against the run (raises GigadiffError)."""
    assert s.width and s.height
    beyond = max(s.width, s.height) > 2 * info.native_size
    stages = min(s.width, s.height) > info.native_size
    if s.coherence == "auto":
        usable = info.can_encode and s.init_image is None
        return "progressive" if beyond and stages and usable else "none"
    if s.coherence == "progressive":
        reason = None
        if not info.can_encode:
            reason = f"model {info.name!r} cannot encode images (stages are decoded, enlarged and encoded again)"
        elif not stages:
            reason = f"the shorter side must exceed the model's native size ({info.native_size}px) to have stages"
        if reason:
            raise GigadiffError(f"{{coherence}} progressive cannot be used here: {reason}", "coherence")
    return s.coherence


def settings_from_options(
    prompt: str = "",
    *,
    size: str | tuple[int, int] | None = None,
    seed: int | None = None,
    sigmas: str | Sequence[float] | None = None,
    options: dict[str, Any] | None = None,
    **fields: Any,
) -> GenerationSettings:
    """Settings from what a user types or passes (size as "WxH" or a pair, seed None = a new random seed,
    sigmas as "80,10" or a list, backend options such as difficulty), checked for everything a model need not
    be loaded for. The CLI and `gigadiff.generate` both build their settings here."""
    width, height = parse_size(size) if isinstance(size, str) else (size or (None, None))
    if isinstance(sigmas, str):
        sigmas = parse_sigmas(sigmas)
    settings = GenerationSettings(
        prompt=prompt,
        width=width,
        height=height,
        seed=new_seed() if seed is None else seed,
        sigmas=tuple(sigmas) if sigmas is not None else None,
        extra=dict(options or {}),
        **fields,
    )
    check_generic(settings)
    return settings
