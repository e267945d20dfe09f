"""A request resolved once into a `Run`: checked, every default filled in, before any weights (or torch) load.

The checks run in the order of their cost: the request's own values (sizes, names, ranges), then the files it
names (regions, init image, output folders), then the model's description from its config files (its sizes
multiple, schedulers, guidance, positions; a preset not yet cached is described by its family until the end),
then the outputs (that they would not be overwritten and that their folders take a new file), and last the
network: a preset's config files fetched from the hub, and the checks that depend on them run again. What
passes is a `Run`: the resolved settings that determine the image, the model's source and description, the
tiled VAE's settings, the output paths and the run's options. `Run.record()` is the resolved request: metadata,
checkpoints and sidecars keep it, and resolving it again gives the same run (`gigadiff resume`, the service
after a restart).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gigadiff.backends.control import check_controls, parse_control, with_image
from gigadiff.backends.device import check_device_name
from gigadiff.backends.loading import Loading
from gigadiff.backends.lora import check_lora_files
from gigadiff.backends.quantized import check_transformer_file
from gigadiff.backends.registry import find_model, gguf_model
from gigadiff.backends.source import present
from gigadiff.backends.upscaler import check_upscaler_file
from gigadiff.errors import GigadiffError, Note
from gigadiff.io.files import check_outputs, relief_path, sidecar_path
from gigadiff.options import RunRequest
from gigadiff.regions import RegionSet, load_region_file, parse_regions
from gigadiff.runs.checks import check_relations, notes, settings_for
from gigadiff.settings import GenerationSettings
from gigadiff.vae.tiling import SPILLING_ENGINES, VaeTiling

if TYPE_CHECKING:
    from gigadiff.backends.family import Family
    from gigadiff.backends.source import ModelSource
    from gigadiff.facts import ModelInfo

OUTPUT_SUFFIXES = (".png", ".tif", ".tiff")
DEFAULT_OUTPUT = "gigadiff.png"


@dataclass(frozen=True)
class Outputs:
    """Where a run writes. `image` always; the rest when asked for (relief: heightmap models)."""

    image: Path
    sidecar: Path
    relief: Path | None = None
    latent: Path | None = None
    checkpoint: Path | None = None
    preview: Path | None = None

    def finished(self) -> list[Path]:
        """The files a finished run writes (checked for existence before it starts)."""
        return [p for p in (self.image, self.sidecar, self.relief, self.latent) if p is not None]


@dataclass(frozen=True)
class Run:
    """A resolved request: everything a generation needs, checked."""

    request: RunRequest
    """The request with every default filled in (seed, size, steps, tile, ...): what `record` returns."""
    settings: GenerationSettings
    source: ModelSource
    family: Family
    info: ModelInfo
    vae: VaeTiling
    outputs: Outputs
    notes: tuple[Note, ...] = ()
    """What the run tells its user before it starts (gigadiff.runs.checks.notes)."""
    tile_batch_given: bool = True
    """Whether the request chose the tile batch (else the default, which the memory plan may lower)."""

    def record(self) -> dict[str, Any]:
        """The resolved request as JSON-safe data (see the module docstring)."""
        return self.request.to_dict()

    def with_tile_batch(self, batch: int, note: Note) -> Run:
        """The run with `batch` tiles per call (told by `note`)."""
        return replace(self, request=self.request.replace(tile_batch=batch),
                       settings=replace(self.settings, tile_batch=batch), notes=(*self.notes, note))  # fmt: skip

    def loading(self, device: str | None = None) -> Loading:
        """How the model's weights load for this run (on `device`, one rank's, or the request's)."""
        r = self.request
        controlnets = tuple(dict.fromkeys(parse_control(text).loaded_as for text in r.control or ()))
        return Loading(device or r.device, r.dtype, r.offload, r.quantize, r.transformer, r.quantize_text,
                       r.compile, r.attention, tuple(r.lora or ()), controlnets)  # fmt: skip


def init_size(path: str, scale: float, multiple: int) -> tuple[int, int]:
    """(width, height) of a run from the image at `path` times `scale`, rounded to `multiple` pixels."""
    from gigadiff.io.images import image_size

    width, height = image_size(path)
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))  # fmt: skip


def _regions(request: RunRequest, allow_files: bool) -> RegionSet | None:
    value = request.regions
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_files:
            raise GigadiffError("{regions} must be given as JSON data here, not as a file name", "regions")
        return load_region_file(Path(value).expanduser())
    return parse_regions(value, "regions", folder=Path.cwd() if allow_files else None)


def _output(request: RunRequest, command: str) -> Path:
    if request.output is not None:
        if not request.output.strip():
            raise GigadiffError("{output} is empty; give a file name ending in .png, .tif or .tiff", "output")
        path = Path(request.output).expanduser()
        if path.name.lower() in OUTPUT_SUFFIXES:
            raise GigadiffError(
                f"{{output}} {path} has a suffix but no file name, e.g. {path.with_name('image' + path.name)}", "output"
            )
    elif command == "upscale" and request.init:
        suffix = f"{1 if request.scale is None else request.scale:g}".replace(".", "_")
        path = Path(request.init).with_name(f"{Path(request.init).stem}_x{suffix}.png")
    else:
        path = Path(DEFAULT_OUTPUT)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise GigadiffError(f"{{output}} {path} must end in .png, .tif or .tiff", "output")
    return path


def with_gguf_model(r: RunRequest) -> RunRequest:
    """`--model x.gguf`: a GGUF transformer run with the rest of the model it belongs to, as `--model MODEL
    --transformer x.gguf` (the model read from the file's tensors: gigadiff.backends.registry.gguf_model)."""
    path = Path(r.model).expanduser()
    if path.suffix != ".gguf":
        return r
    if not path.is_file():
        raise GigadiffError(f"{{model}} file {path} does not exist", "model")
    if r.transformer is not None:
        raise GigadiffError(f"{{model}} {path.name} is a GGUF transformer and {{transformer}} another: give one "
                            "({transformer} beside the diffusers model it belongs to)", "model",
                            "transformer")  # fmt: skip
    base = gguf_model(path)
    if base is None:
        raise GigadiffError(f"{{model}} {path.name} is a GGUF file, which holds only the denoiser, and its tensors do "
                            "not say which model it belongs to (FLUX.1, FLUX.2, SD3/3.5 and Z-Image files do): pass it "
                            "with {transformer} beside the diffusers model it belongs to (e.g. --model qwen-image "
                            f"--transformer {path.name})", "model", "transformer")  # fmt: skip
    return r.replace(model=base, transformer=str(path))


def with_init_controls(r: RunRequest) -> RunRequest:
    """img2img and `upscale`: a `--control MODEL` given without an image is held to the init image itself (a tile
    ControlNet keeping each repainted tile to the picture, as the tiled upscalers of other tools do)."""
    if not r.control or r.init is None or all("=" in item for item in r.control):
        return r
    return r.replace(control=[with_image(item, r.init) for item in r.control])


def _check_options(r: RunRequest) -> None:
    """The request's own values: each option against its declaration, then those no other check covers."""
    check_relations(r)
    check_device_name(r.device)
    if r.save_latent is not None and not r.save_latent.endswith(".safetensors"):
        raise GigadiffError(f"{{save_latent}} {r.save_latent} must end in .safetensors", "save_latent")
    if r.preview is not None and not r.preview.lower().endswith(".png"):
        raise GigadiffError(f"{{preview}} {r.preview} must end in .png", "preview")
    if r.scale is not None and r.init is None and r.size is None:
        raise GigadiffError("{scale} sizes the output from an init image; give {init} IMAGE or a {size}",
                            "scale", "init", "size")  # fmt: skip
    if r.transformer is not None:
        check_transformer_file(r.transformer, r.quantize)
    if r.lora:
        check_lora_files(r.lora)
    if r.control:
        check_controls(r.control)
    if r.upscaler is not None:
        check_upscaler_file(r.upscaler)
    for field in ("quantize", "quantize_text"):
        chosen = getattr(r, field)
        if chosen in ("nf4", "fp8") and r.device in ("cpu", "mps"):
            raise GigadiffError(f"{{{field}}} {chosen} needs a CUDA GPU (device {r.device!r}); use {{{field}}} int8",
                                field, "device")  # fmt: skip


def _init_size(request: RunRequest, info: ModelInfo) -> tuple[int, int] | None:
    """The run's size from its init image when it gives none (and a missing or unreadable image reported now)."""
    if request.init is None:
        return None
    from gigadiff.io.images import image_size

    image_size(request.init)
    if request.size is not None:
        return None
    return init_size(request.init, 1.0 if request.scale is None else request.scale, info.size_multiple)


def _outputs(request: RunRequest, command: str, info: ModelInfo) -> Outputs:
    image = _output(request, command)
    checkpoint = None
    if request.checkpoint_every:
        checkpoint = (
            Path(request.checkpoint) if request.checkpoint else image.with_name(f"{image.stem}.checkpoint.safetensors")
        )
    return Outputs(
        image=image,
        sidecar=sidecar_path(image),
        relief=relief_path(image) if info.output == "heightmap" else None,
        latent=Path(request.save_latent) if request.save_latent else None,
        checkpoint=checkpoint,
        preview=Path(request.preview) if request.preview else None,
    )


def resolve(request: RunRequest, command: str = "generate", allow_files: bool = True, check_files: bool = True,
            described: tuple[ModelSource, Family, ModelInfo] | None = None, resuming: bool = False,
            writes: bool = True) -> Run:  # fmt: skip
    """Check `request` and fill in every default (raises GigadiffError naming the field on the first problem).

    command: "generate" or "upscale" (which sizes and names its output from the init image); allow_files: False
    where the caller may not name files on this machine (the service: regions come as data); check_files:
    False where another process checks the outputs (torchrun ranks other than 0); described: a model found
    already (`find_model`), or one loaded by the caller; resuming: the run continues from its checkpoint file
    (which therefore exists); writes: False where the caller keeps the result in memory (the Python API without
    an output): the record then names no output, and no output is checked.
    """
    request = with_init_controls(with_gguf_model(request))
    _check_options(request)
    regions = _regions(request, allow_files)
    source, family, info = described or find_model(request.model)
    if request.vae_spill is not None and info.vae_engine not in SPILLING_ENGINES:
        raise GigadiffError(f"{{vae_spill}}: model {info.name!r}'s VAE keeps no whole-image buffers to spill (its "
                            f"tiled VAE engine is {info.vae_engine!r}); remove {{vae_spill}}", "vae_spill")  # fmt: skip
    resolved, settings = settings_for(request, info, regions, _init_size(request, info))
    vae = VaeTiling(mode=request.vae_mode, memory_gb=request.vae_memory, wrap=settings.wrap,
                    spill_dir=Path(request.vae_spill) if request.vae_spill else None)  # fmt: skip
    outputs = _outputs(request, command, info)
    if check_files:
        if writes:
            check_outputs(outputs.finished() + ([outputs.preview] if outputs.preview else []), request.overwrite)
        if outputs.checkpoint is not None:
            check_outputs([outputs.checkpoint], request.overwrite or resuming)
    if source.pending:  # a preset's config files from the hub: after every check that needs only its family
        source = present(source)
        info = family.describe(source)
        resolved, settings = settings_for(request, info, regions, _init_size(request, info))
    resolved = resolved.replace(output=str(outputs.image) if writes else None, regions=_recorded_regions(regions),
                                checkpoint=str(outputs.checkpoint) if outputs.checkpoint else None)  # fmt: skip
    return Run(resolved, settings, source, family, info, vae, outputs, notes(resolved, info),
               tile_batch_given=request.tile_batch is not None)  # fmt: skip


def _recorded_regions(regions: RegionSet | None) -> Any:
    """Regions as the record keeps them: the normalised data (masks as absolute paths or data URLs)."""
    if regions is None:
        return None
    items = [{k: list(v) if k == "box" else v for k, v in asdict(r).items() if v is not None} for r in regions.regions]
    return {"background": regions.background, "feather": regions.feather, "regions": items}
