"""What gigadiff knows about a model before it loads: torch-free facts every layer may read.

A model family (gigadiff.backends) turns a model's config files into a `ModelInfo`; every check before a run,
the tile grids, the metadata and `gigadiff metrics` read it. It is plain data, imports nothing of gigadiff,
and is recorded in every output (`ModelInfo.to_dict` / `from_dict`), so a finished image can be measured
with the facts of the model that made it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

SchedulerKind = Literal["ddpm", "flow", "consistency"]
"""How a model's noise schedule works: DDPM-family (betas, epsilon/v prediction), flow matching (sigma from 1
to 0, velocity prediction), or a consistency model (x0 prediction, its own sampler only)."""
GuidanceKind = Literal["cfg", "embedded", "none"]
"""Classifier-free guidance with a negative prompt (two passes), a guidance scale embedded in the model's
conditioning (one pass, FLUX.1-dev), or none (distilled and unconditional models)."""
PositionKind = Literal["none", "rope", "table"]
"""How the denoiser knows where a token is: not at all (convolutional UNets), rotary ids built per call (FLUX,
Z-Image, Qwen-Image: tile-local or canvas ids are equally possible), or a crop of a learned table (SD3)."""
VaeEngine = Literal["groupnorm", "halo", "none"]
"""Which tiled VAE engine a family's codec uses (see `ModelInfo.vae_engine`)."""


@dataclass(frozen=True)
class ShiftRule:
    """How a flow-matching family shifts its timesteps toward high noise as images get larger.

    diffusers computes `mu` from the number of image tokens (and, for FLUX.2, the number of steps) and shifts
    every sigma by exp(mu) / (exp(mu) + 1/sigma - 1); gigadiff applies the rule to the tokens one tile holds
    (see gigadiff.shift). `kind`: "none" (no shift, or not a flow model), "fixed" (a constant
    `shift`, e.g. SD3), "linear" (mu linear in tokens between base_seq_len and max_seq_len: FLUX.1, Z-Image,
    Qwen-Image), "empirical" (FLUX.2's fit over tokens and steps).
    """

    kind: Literal["none", "fixed", "linear", "empirical"] = "none"
    shift: float = 1.0
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15


@dataclass(frozen=True)
class ModelInfo:
    """What the layers above a backend need to know about its model (read from its config files)."""

    name: str
    family: str
    latent_channels: int
    vae_scale_factor: int
    """Image pixels per canvas pixel (8 for the SD VAEs, 16 for FLUX.2's patchified latents, 1 in pixel space)."""
    native_size: int
    """The image side, in pixels, the model was trained at; the default tile."""
    default_size: int | None = None
    """Image side used when the user gives no size; None means twice the native size."""
    gpu_dtype: str = "bf16"
    """What `--dtype auto` runs it in on a GPU: the dtype its diffusers pipeline is run in (fp32: the model has no
    other)."""
    fp16_risk: str = ""
    """Why fp16 is unsafe for it ("" if it is not): `--dtype fp16` is refused unless `--allow-fp16`."""
    attention_backends: bool = False
    """Its denoiser's attention dispatches through diffusers' attention backends (`--attention` applies: the
    FLUX, Z-Image and Qwen-Image transformers; the others call PyTorch's attention directly)."""
    controlnet_class: str | None = None
    """The diffusers class of its ControlNets, which it runs per tile (`--control`), or None: it takes none."""
    loras: bool = False
    """Its diffusers pipeline loads LoRAs (`load_lora_weights`)."""
    diffusers_weights: bool = True
    """Its weights load through diffusers, so `--offload`, `--quantize` and `--transformer` apply (False: the
    ONNX terrain model)."""
    default_steps: int = 30
    min_steps: int = 1
    """Fewest steps the model's scheduler can run (2 where it stretches its schedule to a terminal sigma, as
    Qwen-Image's does: one step leaves nothing to stretch, and diffusers returns NaN)."""
    latent_multiple: int = 1
    """Canvas pixels per token side: tiles, overlaps, shifts and the canvas are multiples of it (FLUX packs 2x2
    latent pixels into one token, so 2: 16 image pixels)."""
    default_overlap_share: float = 1 / 8
    """Default overlap between neighbouring tiles as a share of the tile, and at least 4 x edge_margin (the two
    tiles' rims plus as much again to cross-fade in). Larger for models whose tiles still disagree about content
    at the last step: their cross-fades must be wide (terrain: 1/2)."""
    default_weights: str = "gaussian"
    """The fusion window used when the user names none (see gigadiff.windows)."""
    prediction_range: tuple[float, float] | None = None
    """Bounds the model's predictions never leave (e.g. an x0 model that clamps its output), which fusion
    corrections (gigadiff.levels) must respect too; None: unbounded."""
    default_level_sync: bool = False
    """Whether tiles share one low-frequency level by default (gigadiff.levels): on for few-step models whose
    tiles otherwise paint tile-sized plateaus."""
    default_guidance: float = 7.5
    takes_prompt: bool = True
    guidance_kind: GuidanceKind = "cfg"
    true_cfg: bool = False
    """True classifier-free guidance with a negative prompt is available beside the model's own guidance
    (`--true-cfg S`: FLUX.1, whose guidance is otherwise embedded)."""
    cfg_above: float = 1.0
    """Classifier-free guidance runs when its scale is above this (1 in most pipelines, 0 in Z-Image's)."""
    negative_required: bool = False
    """Classifier-free guidance runs only when a negative prompt is given (FLUX.1's true CFG, Qwen-Image): their
    pipelines turn it off without one rather than guide against the empty prompt."""
    scheduler_kind: SchedulerKind = "ddpm"
    shift_rule: ShiftRule = ShiftRule()
    positions: PositionKind = "none"
    max_global_px: int | None = None
    """Largest canvas side (image px) for which tiles can be given canvas positions (`--positions global`):
    the size of a learned position table, or of a rotary table the model precomputes; None: unlimited."""
    fixed_tile: bool = False
    """True when the network only accepts native-size inputs (e.g. an ONNX graph with fixed H and W)."""
    edge_margin: int = 0
    """Rim, in canvas pixels, along a tile's edges where the model's output is unreliable."""
    options: tuple[str, ...] = ()
    """Family-specific options the model accepts (request fields marked `family`, e.g. difficulty)."""
    fingerprint: str = ""
    """Identifies the weights (not just the name), so a checkpoint is never resumed on another model; filled
    in when the weights are loaded."""
    output: Literal["image", "heightmap"] = "image"
    """"image" (RGB, decoded to [-1, 1]) or "heightmap" (decoded to heights in metres)."""
    can_encode: bool = False
    """True when the codec turns images into latents: needed for img2img and progressive coherence."""
    vae_engine: VaeEngine = "groupnorm"
    """Which tiled VAE engine encodes and decodes its canvas (gigadiff.vae.engines): "groupnorm" (AutoencoderKL
    families: whole-image GroupNorm statistics), "halo" (VAEs without image-wide statistics: Qwen-Image's,
    SANA's DC-AE) or "none" (pixel-space models)."""

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_kind != "none"

    def runs_cfg(self, scale: float | None, negative: str) -> bool:
        """Whether a classifier-free scale (`--guidance` of a "cfg" model, `--true-cfg` beside embedded guidance)
        with this negative prompt makes the two passes, by the model's pipeline's rule."""
        return scale is not None and scale > self.cfg_above and (bool(negative) or not self.negative_required)

    def skipped_steps(self, steps: int, strength: float) -> int:
        """How many of a schedule's `steps` an img2img run of `strength` skips, by the model's img2img pipeline:
        the DDPM pipelines (SD, SDXL) keep int(steps x strength) steps; the flow-matching ones (FLUX, SD3,
        Qwen-Image, Z-Image) start at int(steps - steps x strength), one step earlier when steps x strength is
        not whole (28 steps at 0.35: they run 10 steps, the DDPM rule 9)."""
        if self.scheduler_kind == "flow":
            return int(max(steps - steps * strength, 0))
        return max(steps - min(int(steps * strength), steps), 0)

    def cfg_scale(self, guidance: float | None, true_cfg: float | None) -> float | None:
        """The classifier-free scale of a run: its guidance for a "cfg" model, else its true CFG scale."""
        return guidance if self.guidance_kind == "cfg" else true_cfg

    @property
    def size_multiple(self) -> int:
        """Image pixels a size, tile or overlap must be a multiple of: one token."""
        return self.vae_scale_factor * self.latent_multiple

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        """The facts recorded by `to_dict` (an output's metadata); keys a newer version added are ignored."""
        known = set(cls.__dataclass_fields__)
        raw = {k: v for k, v in data.items() if k in known}
        raw["shift_rule"] = ShiftRule(**raw.get("shift_rule", {}))
        if raw.get("prediction_range") is not None:
            raw["prediction_range"] = tuple(raw["prediction_range"])
        raw["options"] = tuple(raw.get("options", ()))
        return cls(**raw)
