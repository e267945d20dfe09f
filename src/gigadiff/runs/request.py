"""One request type for every front end: everything a generation needs, as a user gives it.

`RunRequest` is the only list of run options. The command line builds its `generate` and `upscale` options from
its fields (flag names, help and per-command defaults live in each field's metadata), `gigadiff.generate`
takes the same fields as keyword arguments, and the service takes them as JSON keys. A request is resolved
once (gigadiff.runs.resolve) into a `Run`, whose record (`Run.record`) is what metadata, checkpoints and
sidecars keep: `gigadiff resume` and `gigadiff metrics` rebuild exactly what ran from it.

Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from gigadiff.errors import GigadiffError

GENERATE, UPSCALE = "generate", "upscale"
BOTH = (GENERATE, UPSCALE)


def option(default: Any, help: str, *flags: str, commands: tuple[str, ...] = BOTH,
           defaults: dict[str, Any] | None = None, argument: tuple[str, ...] = (), cli_type: Any = None,
           bare: Any = None, minimum: float | None = None) -> Any:  # fmt: skip
    """A request field and how the command line shows it.

    flags: extra option names beside `--field-name` (e.g. "-m"); commands: where it is an option;
    defaults: per-command defaults (upscale's gentler strength); argument: commands where it is the positional
    argument; cli_type: the type the command line parses (a regions *file*, where the API also takes JSON
    data); bare: the value a bare `--flag` means (`--tileable` = both); minimum: the smallest value the command
    line accepts (checked by the parser).
    """
    meta = {"help": help, "flags": flags, "commands": commands, "defaults": defaults or {}, "argument": argument,
            "cli_type": cli_type, "bare": bare, "minimum": minimum}  # fmt: skip
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunRequest:
    """Every option of a generation, as given: None means "the model's default" (resolved in gigadiff.runs)."""

    prompt: str = option("", "What to paint.", "-p", argument=(GENERATE,))
    model: str = option("sd15", "A preset (sd15, sdxl, flux-dev, flux-schnell, z-image-turbo, ...), terrain "
                        "(offline), a hub id, a diffusers folder or a single-file checkpoint.", "-m")  # fmt: skip
    size: str | None = option(None, "WIDTHxHEIGHT in pixels (default: the model's; with --init, that image's "
                              "size times --scale).", commands=(GENERATE,))  # fmt: skip
    output: str | None = option(None, "Output .png or .tif (default: gigadiff.png; upscale: IMAGE_x<scale>.png). "
                                "Heightmaps: 16-bit PNG or float TIFF.", "-o")  # fmt: skip
    steps: int | None = option(None, "Denoising steps (default: the model's; upscale runs steps x strength).")
    guidance: float | None = option(None, "Guidance scale (classifier-free, or embedded for FLUX.1-dev).")
    true_cfg: float | None = option(None, "True classifier-free guidance with the negative prompt, for models "
                                    "whose own guidance is embedded (FLUX.1): two passes per tile.")  # fmt: skip
    seed: int | None = option(None, "Random seed (default: a new random seed, recorded in the output).")
    negative: str = option("", "Negative prompt.", defaults={UPSCALE: "blurry, soft, low detail"})
    scheduler: str = option("default", "default, euler, euler_a, heun, dpmpp_2m, unipc, ddim, ... (names a "
                            "model cannot use are refused with the ones it can).")  # fmt: skip
    tile: int | None = option(None, "Tile side in image pixels (default: the model's native size).")
    overlap: int | None = option(None, "Minimum tile overlap in image pixels (default: tile/8, terrain tile/2).")
    weights: str | None = option(None, "Fusion weights: uniform, gaussian, cosine or linear (default: the model's).",
                                 commands=(GENERATE,))  # fmt: skip
    shift: bool = option(True, "Move the tile grid at every step.", commands=(GENERATE,))
    level_sync: bool | None = option(None, "Tiles share the canvas's low frequencies (default: the model's; on "
                                     "for terrain).", commands=(GENERATE,))  # fmt: skip
    tile_batch: int | None = option(None, "Tiles per model call (default: 4, fewer when a step has few tiles).")
    guidance_rescale: float = option(0.0, "Guidance rescale factor in [0, 1] (v-prediction models).",
                                     commands=(GENERATE,))  # fmt: skip
    eta: float = option(0.0, "Noise drawn afresh per step (DDIM, consistency): 0 = deterministic.",
                        commands=(GENERATE,))  # fmt: skip
    sigmas: str | None = option(None, "Explicit decreasing noise levels, e.g. 80,2.5 (sets the steps).",
                                commands=(GENERATE,))  # fmt: skip
    flow_shift: str = option("tile", "Flow models' timestep shift: tile (mu from one tile's tokens), canvas "
                             "(diffusers' rule on the whole canvas), a shift s, or mu=X.")  # fmt: skip
    positions: str = option("local", "DiT position ids: local (every tile from 0, as trained) or global (canvas "
                            "coordinates; one model call per tile for FLUX).", commands=(GENERATE,))  # fmt: skip
    difficulty: float | None = option(None, "Terrain model only: difficulty from 1 (gentle) to 100 (rugged).",
                                      commands=(GENERATE,))  # fmt: skip
    init: str | None = option(None, "img2img: start from this image (resized to --size).", argument=(UPSCALE,))
    scale: float | None = option(None, "With --init and no --size: the output is the image's size times this "
                                 "(rounded to the model's multiple).", defaults={UPSCALE: 2.0})  # fmt: skip
    strength: float | None = option(None, "img2img: how much to repaint, in (0, 1] (default 0.8; upscale 0.35).",
                                    defaults={UPSCALE: 0.35})  # fmt: skip
    coherence: str = option("auto", "progressive (x2 stages from the native size: no repeated subjects), none, "
                            "or auto (progressive for text-to-image beyond twice the native size).")  # fmt: skip
    regions: str | dict[str, Any] | list[Any] | None = option(
        None, "Regional prompts: a JSON file of boxes/masks with their own prompts (the API also takes the JSON "
        "data itself).", commands=(GENERATE,), cli_type=str,
    )  # fmt: skip
    tileable: str = option("none", "Seamless output: bare --tileable (both ways, a texture), x (360-degree "
                           "panorama) or y.", bare="both")  # fmt: skip
    device: str = option("auto", "auto, cuda, cuda:N, mps or cpu.")
    dtype: str = option("fp32", "fp32, fp16 or bf16.")
    vae_mode: str = option("auto", "Tiled VAE: exact (whole-image statistics), fast (streamed tiles), auto.")
    vae_memory: float | None = option(None, "Device memory (GB) a VAE tile may use (default: half the free GPU, "
                                      "2 on CPU).")  # fmt: skip
    vae_spill: str | None = option(None, "Directory for exact-mode VAE buffers that do not fit in RAM.")
    save_latent: str | None = option(None, "Also save the final latent canvas to this .safetensors file.")
    preview: str | None = option(None, "Rewrite this small PNG of the canvas at every step (a cheap projection of "
                                 "the latents, never a decode).")  # fmt: skip
    checkpoint_every: int = option(0, "Save a resumable checkpoint every K steps (0: never).", minimum=0)
    checkpoint: str | None = option(None, "Checkpoint file (default: <output>.checkpoint.safetensors).")
    processes: int = option(1, "Run on N processes (torchrun, one per GPU); the image does not depend on N.",
                            minimum=1)  # fmt: skip
    profile: bool = option(False, "Report compute time, communication time and bytes exchanged per rank.")
    rank_timeout: float = option(600.0, "Seconds a rank may go silent before a multi-process run is ended.")
    cfg_split: bool = option(False, "Several processes only: unconditional and conditional passes on different "
                             "ranks.")  # fmt: skip
    overwrite: bool = option(False, "Replace existing output files.")
    quiet: bool = option(False, "No progress bar.", "-q")

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


def flag(name: str) -> str:
    """A field's command-line flag (`tile_batch` -> `--tile-batch`)."""
    return "--" + name.replace("_", "-")


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


def command_default(name: str, command: str) -> Any:
    f = FIELDS[name]
    return f.metadata["defaults"].get(command, f.default)


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
