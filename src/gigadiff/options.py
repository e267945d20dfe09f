"""Every option of a run, declared once: its name, default, help, group, allowed values and where it applies.

`RunRequest` is the one list of run options. Each field's `Option` says everything any front end needs to know
about it, and everything else is derived from it:

- the command line's `generate`, `upscale` and `resume` options (flags, help, per-command defaults, grouped
  help), gigadiff.cli;
- the Python API's keyword arguments (`gigadiff.generate(**fields)`), gigadiff.api;
- the service's job keys: a job may set every option but those the server sets (`server`), gigadiff.serve.jobs;
- the values' checks (types, choices, bounds: `check_values`), before any model or torch is touched;
- the image options (`image`): the fields of gigadiff.settings.GenerationSettings with the same names, copied
  by name when a request is resolved and shown as flat keys in every output's metadata;
- the family options (`family`): a model family's own settings (ModelInfo.options).

A request is resolved once (gigadiff.runs.resolve) into a `Run` whose record, the resolved request, is what
metadata, checkpoints and sidecars keep. Nothing here imports torch, or anything of gigadiff but its errors and
the fusion windows' names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gigadiff.errors import GigadiffError
from gigadiff.windows import WEIGHT_KINDS

GENERATE, UPSCALE = "generate", "upscale"
BOTH = (GENERATE, UPSCALE)
GROUPS = ("model", "size and tiles", "sampling", "guidance", "coherence", "img2img", "VAE", "output", "device",
          "processes")  # fmt: skip
"""The groups `--help` and the README's option table list options in, in this order."""
OFFLOAD_MODES = ("auto", "none", "model", "group", "sequential")
"""What `--offload` takes (gigadiff.backends.placement)."""
QUANTIZATIONS = ("none", "int8", "fp8", "nf4")
"""What `--quantize` takes (gigadiff.backends.quantized)."""
ATTENTION_BACKENDS = ("auto", "native", "flash", "flash_hub", "flash_varlen", "_flash_3", "_flash_3_hub", "sage",
                      "sage_hub", "sage_varlen", "xformers", "flex", "_native_cudnn", "_native_efficient",
                      "_native_flash", "_native_math")  # fmt: skip
"""What `--attention` takes: diffusers' attention backends (`auto`: the model's own; gigadiff.backends.speed)."""


@dataclass(frozen=True)
class Option:
    """What a front end needs to know about one request field (see the module docstring)."""

    help: str
    group: str
    flags: tuple[str, ...] = ()
    """Extra option names beside `--field-name` (e.g. "-m")."""
    commands: tuple[str, ...] = BOTH
    """The commands that take it as an option."""
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """Per-command defaults that differ from the field's own (upscale's gentler strength)."""
    argument: tuple[str, ...] = ()
    """Commands where it is the positional argument instead of an option."""
    cli_type: Any = None
    """The type the command line parses, where it differs from the API's (a regions *file*)."""
    bare: Any = None
    """The value a bare `--flag` means (`--tileable` alone: both)."""
    choices: tuple[str, ...] = ()
    """The values it may take (a string option)."""
    longest: int = 4096
    """The most characters a string value may have (a prompt is a few hundred; nothing needs megabytes)."""
    metavar: str = ""
    """What `--help` shows for its value (default: its choices, or N / X / TEXT by type; booleans none)."""
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    """An exclusive lower bound (above=0: positive)."""
    below: float | None = None
    """An exclusive upper bound."""
    image: bool = False
    """Determines the image: a field of GenerationSettings of the same name, recorded in the metadata."""
    family: bool = False
    """A model family's own option (accepted by the models whose ModelInfo.options name it)."""
    server: bool = False
    """Set by the service for every job (where files go, which device, how it reports), never by a client."""
    resume: bool = False
    """`gigadiff resume` may change it (where the outputs go, how the continued run reports)."""


def option(default: Any, help: str, *flags: str, group: str, **metadata: Any) -> Any:
    """A request field with default `default`, described by an `Option(help, group, flags, **metadata)`."""
    return field(default=default, metadata={"option": Option(help, group, flags, **metadata)})


@dataclass(frozen=True)
class RunRequest:
    """Every option of a generation, as given: None means "the model's default" (resolved in gigadiff.runs)."""

    prompt: str = option("", "What to paint.", "-p", group="guidance", argument=(GENERATE,), image=True)
    negative: str = option("", "Negative prompt.", group="guidance", defaults={UPSCALE: "blurry, soft, low detail"},
                           image=True)  # fmt: skip
    model: str = option("sd15", "A preset (sd15, sdxl, flux-dev, flux-schnell, z-image-turbo, ...), terrain "
                        "(offline), a hub id, a diffusers folder, a single-file checkpoint, or a GGUF transformer "
                        "(FLUX, SD3/3.5, Z-Image: with the rest of its model from the hub).", "-m",
                        metavar="NAME|PATH", group="model")  # fmt: skip
    difficulty: float | None = option(None, "Terrain model only: difficulty from 1 (gentle) to 100 (rugged).",
                                      metavar="D", group="model", commands=(GENERATE,), minimum=1, maximum=100,
                                      family=True)  # fmt: skip
    size: str | None = option(None, "WIDTHxHEIGHT in pixels, or one number for a square (default: the model's; "
                              "with --init, that image's size times --scale).", metavar="WxH|N", group="size and tiles",
                              commands=(GENERATE,))  # fmt: skip
    tile: int | None = option(None, "Tile side in image pixels (default: the model's native size).",
                              metavar="PX", group="size and tiles", above=0, maximum=8192, image=True)  # fmt: skip
    overlap: int | None = option(None, "Minimum tile overlap in image pixels (default: tile/8, terrain tile/2).",
                                 metavar="PX", group="size and tiles", minimum=0, image=True)  # fmt: skip
    weights: str | None = option(None, "Fusion weights: uniform, gaussian, cosine or linear (default: the "
                                 "model's).", group="size and tiles", commands=(GENERATE,),
                                 choices=WEIGHT_KINDS, image=True)  # fmt: skip
    shift: bool = option(True, "Move the tile grid at every step.", group="size and tiles", commands=(GENERATE,),
                         image=True)  # fmt: skip
    level_sync: bool | None = option(None, "Tiles share the canvas's low frequencies (default: the model's; on "
                                     "for terrain).", group="size and tiles", commands=(GENERATE,),
                                     image=True)  # fmt: skip
    tile_batch: int | None = option(None, "Tiles per model call (default: the largest divisor of a step's tiles up "
                                    "to 4).",
                                    group="size and tiles", minimum=1, maximum=64, image=True)  # fmt: skip
    positions: str = option("local", "DiT position ids: local (every tile from 0, as trained) or global (canvas "
                            "coordinates; one model call per tile for FLUX).", group="size and tiles",
                            commands=(GENERATE,), choices=("local", "global"), image=True)  # fmt: skip
    tileable: str = option("none", "Seamless output: bare --tileable (both ways, a texture), x (360-degree "
                           "panorama) or y.",
                           metavar="[x|y]", group="size and tiles", bare="both", choices=("none", "x", "y", "both"),
                           image=True)  # fmt: skip
    steps: int | None = option(None, "Denoising steps (default: the model's; upscale runs steps x strength).",
                               group="sampling", minimum=1, maximum=1000, image=True)  # fmt: skip
    seed: int | None = option(None, "Random seed (default: a new random seed, recorded in the output).",
                              group="sampling", minimum=0, below=2**64, image=True)  # fmt: skip
    scheduler: str = option("default", "default, euler, euler_a, heun, dpmpp_2m, unipc, ddim, ... (names a model "
                            "cannot use are refused with the ones it can).",
                            metavar="NAME", group="sampling", image=True)  # fmt: skip
    eta: float = option(0.0, "Noise drawn afresh per step (DDIM, consistency): 0 = deterministic.", group="sampling",
                        commands=(GENERATE,), minimum=0, maximum=1, image=True)  # fmt: skip
    sigmas: str | None = option(None, "Explicit decreasing noise levels, e.g. 80,2.5 (sets the steps).",
                                metavar="S1,S2,...", group="sampling", commands=(GENERATE,))  # fmt: skip
    flow_shift: str = option("tile", "Flow models' timestep shift: tile (mu from one tile's tokens), canvas "
                             "(diffusers' rule on the whole canvas), a shift s, or mu=X.",
                             metavar="tile|canvas|S|mu=X", group="sampling",
                             image=True)  # fmt: skip
    guidance: float | None = option(None, "Guidance scale (classifier-free, or embedded for FLUX.1-dev).",
                                    group="guidance", minimum=0, image=True)  # fmt: skip
    true_cfg: float | None = option(None, "True classifier-free guidance with the negative prompt, for models "
                                    "whose own guidance is embedded (FLUX.1): two passes per tile.", group="guidance",
                                    minimum=1, image=True)  # fmt: skip
    guidance_rescale: float = option(0.0, "Guidance rescale factor in [0, 1] (v-prediction models).",
                                     group="guidance", commands=(GENERATE,), minimum=0, maximum=1,
                                     image=True)  # fmt: skip
    coherence: str = option("auto", "progressive (x2 stages from the native size: no repeated subjects), none, or "
                            "auto (progressive for text-to-image beyond twice the native size).", group="coherence",
                            choices=("auto", "progressive", "none"), image=True)  # fmt: skip
    regions: str | dict[str, Any] | list[Any] | None = option(
        None, "Regional prompts: a JSON file of boxes/masks with their own prompts (the API also takes the JSON "
        "data itself).", metavar="FILE.json", group="coherence", commands=(GENERATE,), cli_type=str,
    )  # fmt: skip
    init: str | None = option(None, "img2img: start from this image (resized to --size).", group="img2img",
                              argument=(UPSCALE,), longest=2**30, image=True)  # fmt: skip
    strength: float | None = option(None, "img2img: how much to repaint, in (0, 1] (default 0.8; upscale 0.35).",
                                    group="img2img", defaults={UPSCALE: 0.35}, above=0, maximum=1,
                                    image=True)  # fmt: skip
    upscaler: str | None = option(None, "upscale: enlarge with this super-resolution network first (ESRGAN, "
                                  "Real-ESRGAN, SwinIR, HAT, DAT, ... .pth/.safetensors, loaded by spandrel; run "
                                  "in tiles), then repaint.", metavar="FILE", group="img2img", commands=(UPSCALE,),
                                  image=True)  # fmt: skip
    scale: float | None = option(None, "With --init and no --size: the output is the image's size times this "
                                 "(rounded to the model's multiple).", group="img2img", defaults={UPSCALE: 2.0},
                                 above=0)  # fmt: skip
    vae_mode: str = option("auto", "Tiled VAE: exact (whole-image statistics), fast (streamed tiles), auto.",
                           group="VAE", choices=("auto", "exact", "fast"))  # fmt: skip
    vae_memory: float | None = option(None, "Device memory (GB) a VAE tile may use (default: half the free GPU, 2 "
                                      "on CPU).", metavar="GB", group="VAE", above=0, maximum=4096)  # fmt: skip
    vae_spill: str | None = option(None, "Directory for exact-mode VAE buffers that do not fit in RAM.",
                                   metavar="DIR", group="VAE", server=True)  # fmt: skip
    device: str = option(
        "auto", "auto, cuda, cuda:N, mps or cpu.", metavar="DEVICE", group="device", server=True, resume=True
    )
    dtype: str = option("auto", "auto (fp32 on the CPU; on a GPU what the model's pipeline runs in: fp16 for SD and "
                        "SDXL, bf16 for the DiTs), fp32, fp16 or bf16.", group="device",
                        choices=("auto", "fp32", "fp16", "bf16"))  # fmt: skip
    allow_fp16: bool = option(False, "Run in fp16 a model known to overflow in it (FLUX, Qwen-Image, SD3's T5).",
                              group="device")  # fmt: skip
    offload: str = option("auto", "Weights off the GPU while unused: none; model (one model at a time on the GPU); "
                          "group (the denoiser's blocks in turn, prefetched); sequential (layer by layer: least "
                          "memory, slowest); auto (the least offloading that fits the free GPU memory).",
                          group="device", choices=OFFLOAD_MODES)  # fmt: skip
    quantize: str = option("none", "Quantize the denoiser's weights as they load: int8 (torchao; any device), fp8 "
                           "(torchao; GPUs with fp8, Ada or newer), nf4 (bitsandbytes; CUDA only).",
                           group="device", choices=QUANTIZATIONS)  # fmt: skip
    quantize_text: str = option("none", "Quantize the text encoders' weights as they load, as --quantize does the "
                                "denoiser's (a 24 B encoder such as FLUX.2's in nf4 fits beside it on 24 GB).",
                                group="device", choices=QUANTIZATIONS)  # fmt: skip
    transformer: str | None = option(None, "The denoiser from this single file: a GGUF (Q8_0, Q4_K, ...) or a "
                                     ".safetensors checkpoint (fp8 ones too); the rest of the pipeline from --model.",
                                     metavar="FILE", group="device")  # fmt: skip
    compile: bool = option(False, "Compile the denoiser's repeated blocks with torch.compile (the first step takes "
                           "longer; every call has one shape, so they compile once).", group="device")  # fmt: skip
    control: list[str] | None = option(None, "A ControlNet and its image, MODEL=IMAGE[:SCALE[:START:END]] (a "
                                       "diffusers ControlNet folder or hub id; the image is resized to the canvas "
                                       "and each tile sees its crop); repeat for several. SD, SDXL, SD3, FLUX.1, "
                                       "Qwen-Image, SANA, Z-Image. MODEL#MODE: an SDXL union ControlNet told "
                                       "the kind of its image.",
                                       metavar="MODEL=IMAGE", group="guidance", cli_type=list[str],
                                       image=True)  # fmt: skip
    guess_mode: bool = option(False, "ControlNets of SD/SDXL act on the prompted pass only, scaled up block by block "
                              "(the pipelines' guess_mode: the image matters more than the prompt).",
                              group="guidance", image=True)  # fmt: skip
    lora: list[str] | None = option(None, "A LoRA to apply, FILE.safetensors[:SCALE] (default scale 1); repeat for "
                                    "several. Fused into the weights they adapt.", metavar="FILE[:SCALE]",
                                    group="model", cli_type=list[str])  # fmt: skip
    attention: str = option("auto", "diffusers' attention backend for the DiTs: native, flash, sage, xformers, "
                            "flex, ... (installed separately); auto: the model's own.", metavar="BACKEND",
                            group="device", choices=ATTENTION_BACKENDS)  # fmt: skip
    processes: int = option(1, "Run on N processes (torchrun, one per GPU); the image does not depend on N.",
                            group="processes", minimum=1)  # fmt: skip
    cfg_split: bool = option(False, "Several processes only: unconditional and conditional passes on different "
                             "ranks.", group="processes")  # fmt: skip
    rank_timeout: float = option(600.0, "Seconds a rank may go silent before a multi-process run is ended.",
                                 metavar="SECONDS", group="processes", above=0, server=True, resume=True)  # fmt: skip
    profile: bool = option(False, "Report compute time, communication time and bytes exchanged per rank.",
                           group="processes", server=True, resume=True)  # fmt: skip
    output: str | None = option(None, "Output .png or .tif (default: gigadiff.png; upscale: IMAGE_x<scale>.png). "
                                "Heightmaps: 16-bit PNG or float TIFF.", "-o",
                                metavar="FILE", group="output", server=True,
                                resume=True)  # fmt: skip
    save_latent: str | None = option(None, "Also save the final latent canvas to this .safetensors file.",
                                     metavar="FILE", group="output", server=True)  # fmt: skip
    preview: str | None = option(None, "Rewrite this small PNG of the canvas at every step (a cheap projection of "
                                 "the latents, never a decode).",
                                 metavar="FILE.png", group="output", server=True)  # fmt: skip
    checkpoint_every: int = option(0, "Save a resumable checkpoint every K steps (0: never).",
    metavar="K", group="output",
                                   minimum=0, server=True, resume=True)  # fmt: skip
    checkpoint: str | None = option(None, "Checkpoint file (default: <output>.checkpoint.safetensors).",
                                    metavar="FILE", group="output", server=True)  # fmt: skip
    overwrite: bool = option(False, "Replace existing output files.", group="output", server=True, resume=True)
    quiet: bool = option(False, "No progress bar.", "-q", group="output", server=True, resume=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], what: str = "request") -> RunRequest:
        """A request from JSON-like data (a service job, a recorded run); unknown keys are named."""
        if not isinstance(data, dict):
            raise GigadiffError(f"{what} must be a JSON object of option names and values")
        unknown = sorted(set(data) - set(FIELD_NAMES))
        if unknown:
            raise GigadiffError(f"{what}: unknown option(s) {', '.join(unknown)} (known: {', '.join(FIELD_NAMES)})")
        return cls(**check_types(data, what))

    def replace(self, **changes: Any) -> RunRequest:
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(RunRequest)}
FIELD_NAMES = tuple(FIELDS)
OPTIONS: dict[str, Option] = {name: f.metadata["option"] for name, f in FIELDS.items()}
IMAGE_OPTIONS = tuple(name for name, o in OPTIONS.items() if o.image)
"""The options that determine the image: GenerationSettings' fields of the same names."""
FAMILY_OPTIONS = tuple(name for name, o in OPTIONS.items() if o.family)
SERVER_OPTIONS = tuple(name for name, o in OPTIONS.items() if o.server)
"""Options the service sets for every job: where files go, which device, how it reports."""
CLIENT_OPTIONS = tuple(name for name in FIELD_NAMES if name not in SERVER_OPTIONS)
RESUME_OPTIONS = tuple(name for name, o in OPTIONS.items() if o.resume)


def flag(name: str) -> str:
    """A field's command-line flag (`tile_batch` -> `--tile-batch`)."""
    return "--" + name.replace("_", "-")


def command_default(name: str, command: str) -> Any:
    return OPTIONS[name].defaults.get(command, FIELDS[name].default)


def generate_args(fields: dict[str, Any]) -> list[str]:
    """`gigadiff generate`'s arguments for request fields (the prompt as its argument, the rest as flags): the
    command line equivalent of an API call or a service job."""
    args = ["generate", str(fields.get("prompt", ""))]
    for name, value in fields.items():
        if name == "prompt" or value is None:
            continue
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name}: the command line takes this as a file, not as data")
        if isinstance(value, bool):
            args.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            args += [flag(name), str(value)]
    return args


def _member_ok(value: Any, member: str) -> bool:
    if member == "None":
        return value is None
    if member == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    kinds = {"str": str, "int": int, "float": int | float}
    if member in kinds:
        return isinstance(value, kinds[member])
    return isinstance(value, dict if member.startswith("dict") else list if member.startswith("list") else object)


def _type_ok(value: Any, annotation: str) -> bool:
    return any(_member_ok(value, member) for member in annotation.split(" | "))


def check_types(data: dict[str, Any], what: str = "request") -> dict[str, Any]:
    """Refuse values of the wrong JSON type, naming the field; integers given for floats become floats."""
    out = {}
    for name, value in data.items():
        annotation = str(FIELDS[name].type)
        if not _type_ok(value, annotation):
            expected = annotation.replace(" | None", " or null")
            raise GigadiffError(f"{what}: {{{name}}} must be {expected}, got {json.dumps(value)[:80]}", name)
        number = isinstance(value, int) and not isinstance(value, bool)
        out[name] = float(value) if annotation.startswith("float") and number else value
    return out


def _number(value: float) -> str:
    return "2**64" if value == 2**64 else f"{value:g}"


def bounds_text(o: Option, integer: bool) -> str:
    """What a bounded option's value must do, in words: "be positive", "be at least 1", "be between 1 and
    1000" (integers), "lie in (0, 1]"; "" when it has no bounds."""
    lo = o.above if o.above is not None else o.minimum
    hi = o.below if o.below is not None else o.maximum
    if hi is None:
        return "be positive" if o.above == 0 else f"be at least {_number(lo)}" if lo is not None else ""
    if integer and o.above is None and o.below is None and lo is not None:
        return f"be between {_number(lo)} and {_number(hi)}"
    left = "(" if o.above is not None else "["
    right = ")" if o.below is not None else "]"
    return f"lie in {left}{_number(lo if lo is not None else -math.inf)}, {_number(hi)}{right}"


def check_value(name: str, value: Any) -> None:
    """Refuse a value outside the option's choices or bounds (or a number that is not finite), naming it."""
    o = OPTIONS[name]
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str) and len(value) > o.longest:
        raise GigadiffError(f"{{{name}}} is {len(value)} characters long; at most {o.longest} are taken", name)
    if o.choices and value not in o.choices:
        raise GigadiffError(f"{{{name}}} must be one of {', '.join(o.choices)}, got {value!r}", name)
    if not isinstance(value, int | float):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise GigadiffError(f"{{{name}}} must be a finite number, got {value}", name)
    inside = (
        (o.minimum is None or value >= o.minimum)
        and (o.maximum is None or value <= o.maximum)
        and (o.above is None or value > o.above)
        and (o.below is None or value < o.below)
    )
    if not inside:
        integer = str(FIELDS[name].type).startswith("int")
        raise GigadiffError(f"{{{name}}} must {bounds_text(o, integer)}, got {_number(value)}", name)


def check_values(request: RunRequest) -> None:
    """Every field against its option's choices and bounds (the checks that need nothing but the request)."""
    for name in FIELD_NAMES:
        check_value(name, getattr(request, name))
