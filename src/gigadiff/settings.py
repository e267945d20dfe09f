"""What the user asked for, and the checks that run before any model is loaded or any step is computed.

Sizes here are in image pixels, as users think of them; the recipes convert to latent pixels with the model's
VAE factor. `check_generic` runs before the model is loaded (it needs nothing but the numbers);
`check_for_model` runs once the model's VAE factor is known, still before any compute.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gigadiff.backends.base import ModelInfo
from gigadiff.errors import GigadiffError
from gigadiff.fusion import WEIGHT_KINDS
from gigadiff.schedulers import SCHEDULER_NAMES

MAX_SIDE = 65536
"""Largest accepted side in image pixels. Beyond this the latent canvas alone needs tens of GB."""

MAX_STEPS = 1000
TILEABLE = ("none", "x", "y", "both")
COHERENCE = ("auto", "progressive", "none")
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
        raise GigadiffError(f"size {text!r} is not of the form WIDTHxHEIGHT, e.g. 4096x2048")
    return width, height


def parse_sigmas(text: str) -> tuple[float, ...]:
    """Parse "80,2.5,0.5" into a tuple of noise levels (checked for order in `check_generic`)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise GigadiffError(f"sigmas {text!r} must be comma-separated numbers, e.g. 80,2.5") from None


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
    tile_batch: int = 4
    guidance_rescale: float = 0.0
    eta: float = 0.0
    sigmas: tuple[float, ...] | None = None
    """An explicit noise-level schedule (decreasing); replaces the scheduler's own spacing, and sets steps."""
    init_image: str | None = None
    """img2img / upscaling: the picture to start from (resized to the canvas, encoded by the tiled VAE)."""
    strength: float | None = None
    """How much of the init image is repainted: 1 = all of it (pure noise), 0 = none; None = 0.8 with an image."""
    regions: tuple[dict[str, Any], ...] = ()
    """Regional prompts, as normalised by gigadiff.regions.load_region_file (prompt is then the background's)."""
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
    extra: dict[str, Any] = field(default_factory=dict)
    """Backend-specific settings (e.g. terrain difficulty), kept for metadata."""

    @property
    def wrap(self) -> tuple[bool, bool]:
        return wrap_axes(self.tileable)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_model_defaults(self, info: ModelInfo) -> GenerationSettings:
        """Fill in what the user left open from the model's own defaults."""
        tile = self.tile if self.tile is not None else info.native_size
        factor = info.vae_scale_factor
        share = round(tile * info.default_overlap_share)
        default_overlap = max(share, 4 * info.edge_margin * factor) // factor * factor
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
            raise GigadiffError(f"{name} must be positive, got {value}")
        if value > MAX_SIDE:
            raise GigadiffError(f"{name} {value} is larger than the supported maximum of {MAX_SIDE} pixels")
    if s.steps is not None and not 1 <= s.steps <= MAX_STEPS:
        raise GigadiffError(f"steps must be between 1 and {MAX_STEPS}, got {s.steps}")
    if s.guidance is not None and s.guidance < 0:
        raise GigadiffError(f"guidance must be >= 0, got {s.guidance}")
    if not 0 <= s.guidance_rescale <= 1:
        raise GigadiffError(f"guidance rescale must lie in [0, 1], got {s.guidance_rescale}")
    if not 0 <= s.eta <= 1:
        raise GigadiffError(f"eta must lie in [0, 1], got {s.eta}")
    if s.tile_batch < 1:
        raise GigadiffError(f"tile batch must be at least 1, got {s.tile_batch}")
    if not 0 <= s.seed < 2**64:
        raise GigadiffError(f"seed must lie in [0, 2**64), got {s.seed}")
    if s.scheduler not in SCHEDULER_NAMES:
        raise GigadiffError(f"unknown scheduler {s.scheduler!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
    if s.strength is not None:
        if s.init_image is None:
            raise GigadiffError("--strength applies to an init image; give --init IMAGE (or use gigadiff upscale)")
        if not 0 < s.strength <= 1:
            raise GigadiffError(f"strength must lie in (0, 1], got {s.strength}")
    if s.coherence not in COHERENCE:
        raise GigadiffError(f"coherence must be one of {', '.join(COHERENCE)}, got {s.coherence!r}")
    if not (s.skip_exponent > 0 and s.dilation_exponent > 0):
        raise GigadiffError("coherence exponents must be positive")
    if s.tileable not in TILEABLE:
        raise GigadiffError(f"tileable must be one of {', '.join(TILEABLE)}, got {s.tileable!r}")
    if s.weights is not None and s.weights not in WEIGHT_KINDS:
        raise GigadiffError(f"unknown weights {s.weights!r}; choose one of: {', '.join(WEIGHT_KINDS)}")
    if s.tile is not None and s.tile <= 0:
        raise GigadiffError(f"tile must be positive, got {s.tile}")
    if s.overlap is not None and s.overlap < 0:
        raise GigadiffError(f"overlap must be >= 0, got {s.overlap}")
    if s.tile is not None and s.overlap is not None and s.overlap >= s.tile:
        raise GigadiffError(f"overlap ({s.overlap}px) must be smaller than the tile ({s.tile}px)")
    if s.sigmas is not None:
        if not s.sigmas or any(v <= 0 for v in s.sigmas) or list(s.sigmas) != sorted(s.sigmas, reverse=True):
            raise GigadiffError(f"sigmas must be positive and decreasing, got {list(s.sigmas)}")
        if s.steps is not None and s.steps != len(s.sigmas):
            raise GigadiffError(f"{len(s.sigmas)} sigmas given but steps is {s.steps}; give one or the other")


def check_for_model(s: GenerationSettings, info: ModelInfo) -> GenerationSettings:
    """Checks that need the model; returns the settings with every default filled in."""
    check_generic(s)
    if (s.prompt or s.negative_prompt) and not info.takes_prompt:
        raise GigadiffError(f"model {info.name!r} takes no prompt; remove the prompt and negative prompt")
    if s.guidance is not None and not info.uses_guidance:
        raise GigadiffError(f"model {info.name!r} does not use classifier-free guidance; remove --guidance")
    if s.scheduler != "default" and info.fixed_scheduler:
        raise GigadiffError(f"model {info.name!r} has its own sampler; --scheduler must be 'default'")
    if s.init_image is not None and not info.can_encode:
        raise GigadiffError(f"model {info.name!r} cannot encode images, so it cannot start from an init image")
    if s.regions and not info.takes_prompt:
        raise GigadiffError(f"model {info.name!r} takes no prompt, so it cannot take regional prompts")
    unknown = sorted(set(s.extra) - set(info.options))
    if unknown:
        accepted = ", ".join(info.options) or "none"
        raise GigadiffError(f"model {info.name!r} does not accept {', '.join(unknown)} (it accepts: {accepted})")
    f = info.vae_scale_factor
    resolved = s.with_model_defaults(info)
    check_generic(resolved)
    assert resolved.width is not None and resolved.height is not None
    assert resolved.tile is not None and resolved.overlap is not None
    for name, value in (("width", resolved.width), ("height", resolved.height)):
        if value % f:
            lower, upper = value // f * f, (value // f + 1) * f
            raise GigadiffError(
                f"{name} {value} is not a multiple of {f} (this model's VAE downsampling factor); "
                f"use {lower or upper} or {upper}"
            )
    if resolved.tile % f or resolved.overlap % f:
        raise GigadiffError(
            f"tile ({resolved.tile}px) and overlap ({resolved.overlap}px) must be multiples of {f} "
            "(this model's VAE downsampling factor)"
        )
    if resolved.tile < 2 * f:
        raise GigadiffError(f"tile ({resolved.tile}px) must be at least {2 * f}px")
    if resolved.overlap >= resolved.tile:
        raise GigadiffError(f"overlap ({resolved.overlap}px) must be smaller than the tile ({resolved.tile}px)")
    if info.fixed_tile:
        n = info.native_size
        if resolved.tile != n:
            raise GigadiffError(f"model {info.name!r} only takes {n}x{n} tiles; remove --tile or set it to {n}")
        if min(resolved.width, resolved.height) < n:
            raise GigadiffError(
                f"size {resolved.width}x{resolved.height} is smaller than model {info.name!r}'s {n}x{n} input"
            )
    if (
        resolved.init_image is not None
        and resolved.strength is not None
        and int(resolved.steps * resolved.strength) < 1
    ):
        raise GigadiffError(
            f"strength {resolved.strength} of {resolved.steps} steps leaves no step to run "
            f"(steps x strength must be at least 1); raise --strength or --steps"
        )
    resolved = replace(resolved, coherence=_coherence(resolved, info))
    if resolved.level_sync and resolved.regions:
        raise GigadiffError(
            "--level-sync cannot be used with regional prompts yet (its probe measures the background prompt's "
            "response alone); add --no-level-sync"
        )
    if resolved.regions:
        from gigadiff.regions import check_regions

        check_regions(resolved.regions, resolved.width, resolved.height)
    rim = info.edge_margin * f
    if rim and resolved.overlap < 2 * rim and resolved.tile < max(resolved.width, resolved.height):
        raise GigadiffError(
            f"overlap ({resolved.overlap}px) must be at least {2 * rim}px for model {info.name!r}: its output is "
            f"unreliable within {rim}px of a tile edge, so neighbouring tiles must cover each other's rims"
        )
    return resolved


def _coherence(s: GenerationSettings, info: ModelInfo) -> str:
    """Resolve "auto" and check an explicit "progressive" against the run (raises GigadiffError)."""
    assert s.width and s.height
    beyond = max(s.width, s.height) > 2 * info.native_size
    stages = min(s.width, s.height) > info.native_size
    if s.coherence == "auto":
        usable = info.can_encode and s.init_image is None and not s.regions
        return "progressive" if beyond and stages and usable else "none"
    if s.coherence == "progressive":
        reason = None
        if not info.can_encode:
            reason = f"model {info.name!r} cannot encode images (stages are decoded, enlarged and encoded again)"
        elif s.init_image is not None:
            reason = "an img2img run follows its init image instead"
        elif s.regions:
            reason = "regional prompts are not supported with it yet; add --coherence none"
        elif not stages:
            reason = f"the shorter side must exceed the model's native size ({info.native_size}px) to have stages"
        if reason:
            raise GigadiffError(f"--coherence progressive cannot be used here: {reason}")
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
