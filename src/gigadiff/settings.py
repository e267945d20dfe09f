"""What determines a generated image: a resolved request's image options, parsed, and what follows from them.

`GenerationSettings` is never written by hand: the run layer builds it from a resolved request
(gigadiff.runs.checks.settings_for), copying the image options (gigadiff.options, `image=True`) by name and
adding what it parsed or derived (the canvas size, explicit sigmas, regions, the timestep shift, the family's
own options). Recipes, grids and metadata read it; sizes are in image pixels, as users think of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gigadiff.regions import Region

RENAMED = {"negative_prompt": "negative", "init_image": "init", "extra": "family_options"}
"""Names of settings in outputs of gigadiff 0.1's first releases, and their names now."""


def wrap_axes(tileable: str | None) -> tuple[bool, bool]:
    """(vertical, horizontal): the axes on which a `tileable` ("both", "x", "y", "none") image continues."""
    return tileable in ("y", "both"), tileable in ("x", "both")


@dataclass(frozen=True)
class GenerationSettings:
    """Every setting that determines a generated image, resolved (no field means "the model's default" here);
    embedded in the output's metadata. See gigadiff.options.RunRequest for what the image options mean."""

    # The request's image options (gigadiff.options.IMAGE_OPTIONS), resolved:
    prompt: str
    negative: str
    seed: int
    steps: int
    scheduler: str
    eta: float
    flow_shift: str
    guidance: float | None
    """None for models without guidance."""
    true_cfg: float | None
    guidance_rescale: float
    tile: int
    overlap: int
    weights: str
    shift: bool
    level_sync: bool
    tile_batch: int
    positions: str
    tileable: str
    coherence: str
    """"progressive" or "none" ("auto" is resolved)."""
    init: str | None
    """img2img / upscaling: the picture to start from (resized to the canvas, encoded by the tiled VAE)."""
    strength: float | None
    """How much of the init image is repainted (with an init image; None without)."""
    upscaler: str | None
    """A super-resolution network the init image goes through before it is resized (gigadiff.backends.upscaler)."""
    control: list[str] | None
    """ControlNets with their images, MODEL=IMAGE[:SCALE[:START:END]] (gigadiff.backends.control)."""
    guess_mode: bool
    """SD/SDXL ControlNets on the prompted pass only, their residuals scaled up from the shallowest block."""
    # Parsed and derived:
    width: int
    height: int
    sigmas: tuple[float, ...] | None
    """An explicit noise-level schedule (decreasing); replaces the scheduler's own spacing, and sets steps."""
    regions: tuple[Region, ...]
    """Regional prompts (gigadiff.regions); the prompt is then the background's."""
    region_feather: int
    """Image pixels over which region edges inside the canvas fade (see gigadiff.regions)."""
    mu: float | None
    """The timestep shift the run uses (resolved from flow_shift; None: a fixed-shift or non-flow model's own)."""
    family_options: dict[str, Any]
    """The model family's own options that were given (e.g. terrain's difficulty)."""

    @property
    def wrap(self) -> tuple[bool, bool]:
        return wrap_axes(self.tileable)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSettings:
        """Settings recorded by `to_dict` (an output's metadata; older outputs' names are read too)."""
        raw = {RENAMED.get(k, k): v for k, v in data.items()}
        raw = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        sigmas = raw.get("sigmas")
        raw["sigmas"] = tuple(sigmas) if sigmas is not None else None
        raw["regions"] = tuple(Region.from_dict(r) for r in raw.get("regions") or ())
        raw.setdefault("guess_mode", False)  # outputs made before the option
        return cls(**raw)

    @property
    def conditioning_options(self) -> dict[str, Any]:
        """What a backend's `condition` may read beside the prompt: guidance details, positions, family options."""
        return {"guidance_rescale": self.guidance_rescale, "true_cfg": self.true_cfg, "positions": self.positions,
                "control": self.control or [], "guess_mode": self.guess_mode, **self.family_options}  # fmt: skip
