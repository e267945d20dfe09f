"""A model family: one declaration of what it is and can do, and the adapter that runs it.

A family module under `backends/` subclasses `Family` and fills in:

- **detection**: the diffusers pipeline classes it runs (`pipelines`, matched against model_index.json's
  `_class_name` or a loaded pipeline's class), the tensor-name prefixes of its single-file checkpoints
  (`single_file_markers`), built-in model names;
- **presets**: short names with the hub id and the defaults that suit each model;
- **capabilities**: scheduler kind, guidance kind, position kind, the latent multiple a tile must respect, the
  timestep shift rule, whether its codec can encode; `describe` turns these and the model's config files into
  the `ModelInfo` every check runs against, before any weights load;
- **the adapter**: `adapt(pipe, info)` wraps a loaded pipeline into a `Backend` (and its `Codec`).

Adding a family is one such module and one line in gigadiff.backends.registry. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, cast

from gigadiff.errors import GigadiffError
from gigadiff.facts import GuidanceKind, ModelInfo, PositionKind, SchedulerKind, ShiftRule, VaeEngine

if TYPE_CHECKING:
    from gigadiff.backends.base import Backend
    from gigadiff.backends.loading import Loading
    from gigadiff.backends.source import ModelSource


@dataclass(frozen=True)
class Preset:
    """A popular model of a family under a short name, with the defaults that suit it."""

    name: str
    repo: str
    steps: int
    guidance: float
    native_size: int | None = None
    """The size the model was trained at, where its config does not say it (SDXL-Turbo: 512)."""
    default_size: int | None = None
    gated: bool = False
    """Its hub page asks for a licence to be accepted (and downloads need a login)."""


class Family:
    """Declaration and adapter of one model family (see the module docstring)."""

    name: ClassVar[str]
    pipelines: ClassVar[tuple[str, ...]] = ()
    single_file_markers: ClassVar[tuple[str, ...]] = ()
    single_file_pipeline: ClassVar[str] = ""
    """The diffusers pipeline class that loads this family's single-file checkpoints."""
    builtin: ClassVar[tuple[str, ...]] = ()
    presets: ClassVar[tuple[Preset, ...]] = ()
    scheduler_kind: ClassVar[SchedulerKind] = "ddpm"
    guidance_kind: ClassVar[GuidanceKind] = "cfg"
    positions: ClassVar[PositionKind] = "none"
    latent_multiple: ClassVar[int] = 1
    can_encode: ClassVar[bool] = True
    vae: ClassVar[str] = "AutoencoderKL"
    """The codec's VAE class (documentation, and the tiled VAE's check of what it handles)."""
    vae_engine: ClassVar[VaeEngine] = "groupnorm"
    """The tiled VAE engine its codec runs (gigadiff.vae.engines)."""
    cfg_above: ClassVar[float] = 1.0
    negative_required: ClassVar[bool] = False
    gpu_dtype: ClassVar[str] = "bf16"
    """The dtype its pipeline runs in on a GPU (`--dtype auto`)."""
    fp16_risk: ClassVar[str] = ""
    """Why fp16 overflows for it ("" if it does not)."""
    attention_backends: ClassVar[bool] = False
    """Its denoiser's attention dispatches through diffusers' attention backends (`--attention`)."""
    controlnet_class: ClassVar[str | None] = None
    """The diffusers class of its ControlNets, which it runs per tile (`--control`); None: it takes none."""
    loras: ClassVar[bool] = True
    """Its diffusers pipeline loads LoRAs (every family's but PixArt-Σ's)."""
    default_native: ClassVar[int] = 512
    default_steps: ClassVar[int] = 30
    default_guidance: ClassVar[float] = 7.5

    def preset(self, name: str | None) -> Preset | None:
        return next((p for p in self.presets if p.name == name), None)

    def matches(self, source: ModelSource) -> bool:
        """Whether this family runs `source` (by pipeline class, single-file tensor names or built-in name)."""
        if source.kind == "builtin":
            return source.location in self.builtin
        if source.kind == "file":
            return bool(self.single_file_markers) and any(
                k.startswith(self.single_file_markers) for k in source.file_keys
            )
        return source.pipeline_class in self.pipelines

    def describe(self, source: ModelSource) -> ModelInfo:
        """The model's `ModelInfo`, from the family's declaration, its preset and its config files."""
        raise NotImplementedError

    def base_info(self, source: ModelSource, **fields: Any) -> ModelInfo:
        """`ModelInfo` with the family's declared capabilities and its preset's defaults; `fields` add to it."""
        preset = self.preset(source.preset)
        defaults: dict[str, Any] = {
            "name": source.name,
            "family": self.name,
            "scheduler_kind": self.scheduler_kind,
            "guidance_kind": self.guidance_kind,
            "positions": self.positions,
            "latent_multiple": self.latent_multiple,
            "can_encode": self.can_encode,
            "vae_engine": self.vae_engine,
            "cfg_above": self.cfg_above,
            "gpu_dtype": self.gpu_dtype,
            "fp16_risk": self.fp16_risk,
            "attention_backends": self.attention_backends,
            "loras": self.loras,
            "controlnet_class": self.controlnet_class,
            "negative_required": self.negative_required,
            "native_size": self.default_native,
            "default_steps": self.default_steps,
            "default_guidance": self.default_guidance,
        }
        if source.scheduler_config().get("shift_terminal"):
            defaults["min_steps"] = 2
        defaults.update(fields)
        if preset is not None:
            defaults.update(default_steps=preset.steps, default_guidance=preset.guidance)
            if preset.native_size:
                defaults["native_size"] = preset.native_size
            if preset.default_size:
                defaults["default_size"] = preset.default_size
        return ModelInfo(**defaults)

    def load(self, source: ModelSource, info: ModelInfo, loading: Loading) -> Backend:
        """Load the weights and wrap them (diffusers families: `from_pretrained` or `from_single_file`)."""
        from gigadiff.backends.pipelines import load_pipeline

        pipe = load_pipeline(source, self.single_file_pipeline, loading, info)
        backend = self.adapt(pipe, info)
        backend.setup.update(loading.recorded(quantized="quantization" in backend.setup))
        if loading.controlnets:
            from gigadiff.backends.control import load_controlnets

            adapter = cast(Any, backend)
            adapter.add_controlnets(load_controlnets(loading.controlnets, info, adapter.dtype, adapter.device))
        park = getattr(backend, "park_text_encoders", None)
        if park is not None:
            park("cpu")  # a pipeline gigadiff loaded: its text encoders wait on the host between encodings
        return backend

    def adapt(self, pipe: Any, info: ModelInfo) -> Backend:
        """A backend for a loaded pipeline of this family."""
        raise NotImplementedError


def vae_factor(source: ModelSource, default: int = 8) -> int:
    """Image pixels per VAE latent pixel, from the VAE's config (2 ** (number of blocks - 1))."""
    blocks = source.config("vae").get("block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else default


def flow_shift_rule(source: ModelSource) -> ShiftRule:
    """The timestep shift of a flow model's scheduler config: dynamic (mu from tokens) or a fixed shift."""
    cfg = source.scheduler_config()
    if cfg.get("use_dynamic_shifting"):
        return ShiftRule(
            "linear",
            base_seq_len=int(cfg.get("base_image_seq_len", 256)),
            max_seq_len=int(cfg.get("max_image_seq_len", 4096)),
            base_shift=float(cfg.get("base_shift", 0.5)),
            max_shift=float(cfg.get("max_shift", 1.15)),
        )
    return ShiftRule("fixed", shift=float(cfg.get("shift", cfg.get("flow_shift", 1.0))))


def with_fingerprint(info: ModelInfo, fingerprint: str) -> ModelInfo:
    return replace(info, fingerprint=fingerprint)


def require_component(source: ModelSource, component: str) -> dict[str, Any]:
    """A component's config, or a clear error naming what is missing from the model."""
    cfg = source.config(component)
    if not cfg and source.kind not in ("file", "builtin"):
        raise GigadiffError(f"model {source.name!r} has no {component} config ({component}/config.json)", "model")
    return cfg
