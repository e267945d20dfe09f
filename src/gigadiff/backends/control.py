"""ControlNets per tile: `--control MODEL[#MODE]=IMAGE[:SCALE[:START:END]]`, repeatable.

The control image is resized to the canvas once, as the family's ControlNet pipeline resizes it to its image
(diffusers' image processor, values in [0, 1]); every tile's ControlNet then sees the crop of the image under its
window, so a tiled run holds each tile to its own part of the picture, and a one-tile run is the pipeline's run.
The conditioning scale and the fraction of the schedule where a ControlNet acts (START to END) are taken as the
pipelines take them (`controlnet_conditioning_scale`, `control_guidance_start/end`: a step i of n acts when
i/n >= START and (i+1)/n <= END). Several ControlNets add their residuals, as diffusers' MultiControlNet does.

The ControlNet models load with the pipeline (`Loading.controlnets`); the images and their scales are the run's
(they determine the picture), passed to `condition` in its options. Preprocessors (edges, depth, pose) are the
user's: the image is the control itself.

A union ControlNet (one network, several kinds of control image: SDXL's ControlNetUnionModel, FLUX.1's
FluxControlNetModel with `num_mode`) takes its kind as `#MODE` after the model (the pipeline's `control_mode`, an
index into the net's control types: for xinsir's SDXL union nets 0 pose, 1 depth, 2 soft edges, 3 lines, 4
normals, 5 segments, 6 tile; for InstantX's FLUX.1 union net 0 canny, 1 tile, 2 depth, 3 blur, 4 pose, 5 gray,
6 low quality).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gigadiff.errors import GigadiffError, first_line

if TYPE_CHECKING:
    import torch

    from gigadiff.facts import ModelInfo
    from gigadiff.geometry import Tile


@dataclass(frozen=True)
class ControlSpec:
    model: str
    image: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: int | None = None
    """A union ControlNet's kind of control image (`MODEL#MODE`); None for the others."""

    @property
    def loaded_as(self) -> str:
        """The name the loader is given: the model, with a union net's `#MODE` (it picks a hub id's class)."""
        return self.model if self.mode is None else f"{self.model}#{self.mode}"


def _numbers_off(text: str) -> tuple[str, list[str]]:
    """`text` without its trailing `:NUMBER` parts (at most three), and those numbers as written."""
    parts = text.rsplit(":", 3)
    numbers: list[str] = []
    while len(parts) > 1:
        try:
            float(parts[-1])
        except ValueError:
            break
        numbers.insert(0, parts.pop())
    return ":".join(parts), numbers


def with_image(text: str, image: str) -> str:
    """`MODEL[:SCALE[:START:END]]` given `image`: `MODEL=IMAGE[:SCALE[:START:END]]` (unchanged when it has one)."""
    if "=" in text:
        return text
    model, numbers = _numbers_off(text)
    return ":".join([f"{model}={image}", *numbers])


def split_mode(model: str) -> tuple[str, int | None]:
    """`MODEL[#MODE]` as (MODEL, MODE): a mode only where what follows the last `#` is a whole number."""
    name, hash_, suffix = model.rpartition("#")
    return (name, int(suffix)) if hash_ and name and suffix.isdigit() else (model, None)


def parse_control(text: str) -> ControlSpec:
    """`MODEL[#MODE]=IMAGE[:SCALE[:START:END]]` (numbers only where what follows a colon is one: paths may hold
    colons; the mode as `split_mode` reads it)."""
    shown = text if len(text) <= 80 else text[:77] + "..."
    model, equals, rest = text.partition("=")
    if not equals or not model or not rest:
        raise GigadiffError(f"{{control}} {shown!r} must be MODEL[#MODE]=IMAGE[:SCALE[:START:END]]", "control")
    image, written = _numbers_off(rest)
    numbers = [float(n) for n in written]
    if len(numbers) not in (0, 1, 3):
        raise GigadiffError(f"{{control}} {shown!r}: give SCALE, or SCALE:START:END", "control")
    model, mode = split_mode(model)
    if mode is not None and mode > 63:
        raise GigadiffError(f"{{control}} {shown!r}: MODE {mode} is not a union ControlNet's control type",
                            "control")  # fmt: skip
    scale, start, end = [*numbers, 0.0, 1.0][:3] if len(numbers) == 1 else (numbers or [1.0, 0.0, 1.0])
    spec = ControlSpec(model, image, scale, start, end, mode)
    if not (0 <= spec.start < spec.end <= 1):
        raise GigadiffError(f"{{control}} {shown!r}: START and END must satisfy 0 <= START < END <= 1", "control")
    if not -10 <= spec.scale <= 10:
        raise GigadiffError(f"{{control}} {shown!r}: SCALE must lie in [-10, 10]", "control")
    return spec


def check_controls(texts: list[str] | tuple[str, ...], allow_files: bool = True) -> list[ControlSpec]:
    """The `--control` values parsed, their images readable (before anything loads)."""
    from gigadiff.io.images import image_size

    specs = [parse_control(text) for text in texts]
    for spec in specs:
        if allow_files and not spec.image.startswith("data:") and not Path(spec.image).expanduser().is_file():
            raise GigadiffError(f"{{control}} image {spec.image} does not exist", "control")
        image_size(spec.image)
    return specs


@dataclass(frozen=True)
class Control:
    """One ControlNet of a run: its model, its image at canvas size [1, 3, H, W] on the device, when it acts."""

    model: Any
    image: torch.Tensor
    scale: float
    start: float
    end: float
    mode: int | None = None
    """A union ControlNet's control type (`ControlSpec.mode`)."""

    def acts(self, index: int, steps: int) -> bool:
        return not (index / steps < self.start or (index + 1) / steps > self.end)

    def crops(self, tiles: Sequence[Tile], factor: int) -> torch.Tensor:
        """The image under each tile's window [N, 3, h*factor, w*factor]."""
        import torch

        return torch.cat([self.image[:, :, t.y * factor : (t.y + t.h) * factor, t.x * factor : (t.x + t.w) * factor]
                          for t in tiles])  # fmt: skip


def run_controls(options: Any, models: dict[str, Any], processor: Callable[[], Any], canvas_px: tuple[int, int],
                 device: Any, dtype: Any) -> tuple[Control, ...]:  # fmt: skip
    """The run's `--control` values (`options["control"]`) with their images at canvas size by the family
    pipeline's control image processor (made by `processor`, only when there are any); () without any."""
    if not options.get("control"):
        return ()
    specs = [parse_control(text) for text in options["control"]]
    return prepare_controls(specs, models, processor(), canvas_px, device, dtype)


def unet_processor(vae_scale_factor: int) -> Any:
    """The control image processor of the SD and SDXL ControlNet pipelines: RGB, values in [0, 1]."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False)


def pipeline_processor(vae_scale_factor: int) -> Any:
    """The control image processor of the DiT ControlNet pipelines (FLUX.1, Qwen-Image, Z-Image): sides multiples of two
    latent pixels, values in [-1, 1]."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2)


def summed_residuals(total: Any, residuals: Any) -> Any:
    """Residuals of several ControlNets summed, block by block (None: none yet), as diffusers' multi-ControlNet
    models sum them."""
    if residuals is None:
        return total
    if total is None:
        return list(residuals) if isinstance(residuals, (list, tuple)) else residuals
    if isinstance(residuals, dict):  # keyed by the block they join (Z-Image)
        merged = dict(total)
        for k, v in residuals.items():
            merged[k] = merged[k] + v if k in merged else v
        return merged
    if isinstance(residuals, (list, tuple)):
        return [a + b for a, b in zip(total, residuals, strict=True)]
    return total + residuals


def encoded_controls(controls: tuple[Control, ...], takes_latents: Callable[[Control], bool], codec: Any,
                     generator: Any, tiling: Any, listener: Any, dtype: Any) -> tuple[Control, ...]:  # fmt: skip
    """The controls whose nets read latents with their image VAE-encoded (tiled), a posterior sample drawn with
    `generator` as the DiT ControlNet pipelines draw it; the others as they are."""
    from dataclasses import replace

    return tuple(replace(c, image=codec.encode(c.image.float(), generator, tiling, listener).to(dtype))
                 if takes_latents(c) else c for c in controls)  # fmt: skip


def _config(name: str) -> dict[str, Any] | None:
    """A local ControlNet folder's config.json (None for a hub id, or a folder without one)."""
    import json

    config = Path(name).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        return dict(json.loads(config.read_text()))
    except (OSError, ValueError) as e:
        raise GigadiffError(f"{{control}}: ControlNet {name!r} has an unreadable config.json ({first_line(e)})",
                            "control") from None  # fmt: skip


UNION_CLASS = "ControlNetUnionModel"
UNION_FAMILIES = ("sdxl", "flux")
"""The families whose diffusers pipelines drive union ControlNets: SDXL's as their own class
(StableDiffusionXLControlNetUnionPipeline), FLUX.1's as its ControlNet class with modes (FluxControlNetPipeline)."""


def controlnet_class(name: str, info: ModelInfo, mode: int | None = None) -> str:
    """The diffusers class a ControlNet loads as: the family's, or the union class on SDXL (from a local config,
    or for a hub id given a `#MODE`)."""
    assert info.controlnet_class is not None
    config = _config(name) or {}
    union = config.get("_class_name") == UNION_CLASS or (not config and mode is not None)
    return UNION_CLASS if union and info.family == "sdxl" else info.controlnet_class


def union_types(config: dict[str, Any], info: ModelInfo) -> int | None:
    """How many kinds of control image a union ControlNet's config names (None: not a union net here)."""
    if info.family == "sdxl" and config.get("_class_name") == UNION_CLASS:
        return int(config.get("num_control_type") or 6)
    if info.family == "flux" and config.get("num_mode") is not None:
        return int(config["num_mode"])
    return None


def check_controlnet_class(name: str, info: ModelInfo, mode: int | None = None) -> None:
    """Refuse, before any weights load, a local ControlNet made for another family (its config names its class:
    loaded as the wrong class, its weights would be left out and random ones used), one this run cannot drive
    (an inpainting net), a union net without its `#MODE` (or with one beyond its control types), and a `#MODE` on
    a net that is not a union one."""
    config = _config(name)
    if config is None:
        if mode is not None and info.family not in UNION_FAMILIES:
            raise GigadiffError(f"{{control}}: #MODE is for union ControlNets, which run on SDXL and FLUX.1 only; "
                                f"model {info.name!r} is a {info.family} model", "control")  # fmt: skip
        return
    kind = config.get("_class_name")
    types = union_types(config, info)
    if kind is not None and kind != info.controlnet_class and not (types and kind == UNION_CLASS):
        raise GigadiffError(f"{{control}}: ControlNet {name!r} is a {kind}; model {info.name!r} ({info.family}) takes "
                            f"a {info.controlnet_class}", "control")  # fmt: skip
    if config.get("extra_condition_channels") or config.get("extra_conditioning_channels"):
        raise GigadiffError(f"{{control}}: ControlNet {name!r} is an inpainting ControlNet (it reads a mask beside its "
                            "image), which gigadiff does not drive yet", "control")  # fmt: skip
    if types is not None:
        if mode is None or not 0 <= mode < types:
            given = "no #MODE" if mode is None else f"#{mode}"
            raise GigadiffError(f"{{control}}: ControlNet {name!r} is a union ControlNet of {types} control types: "
                                f"name the kind of its image as {name}#MODE=IMAGE, MODE from 0 to {types - 1} "
                                f"({given} given)", "control")  # fmt: skip
    elif mode is not None:
        raise GigadiffError(f"{{control}}: ControlNet {name!r} is not a union ControlNet: it takes no #MODE",
                            "control")  # fmt: skip


def check_controlnet_table(name: str, info: ModelInfo, width: int, height: int) -> None:
    """With global positions, refuse (before any weights load) a local ControlNet whose own position table is
    smaller than the canvas (SD3's nets carry one; those that borrow the transformer's are checked with it)."""
    config = _config(name)
    if config is None or config.get("use_pos_embed") is False:
        return
    size, patch = config.get("pos_embed_max_size"), config.get("patch_size")
    if size and patch:
        refuse_small_table(int(size) * int(patch) * info.vae_scale_factor, width, height)


def refuse_small_table(table_px: int, width: int, height: int) -> None:
    """The refusal of global positions on a canvas larger than a ControlNet's position table (table_px a side)."""
    if max(width, height) > table_px:
        raise GigadiffError(f"{{positions}} global: a ControlNet's position table covers {table_px}px a side, the "
                            f"canvas is {width}x{height}; use {{positions}} local (any size) or a smaller {{size}}",
                            "positions", "size")  # fmt: skip


def load_controlnets(models: tuple[str, ...], info: ModelInfo, dtype: Any, device: Any) -> dict[str, Any]:
    """The ControlNet models (of the family's class, or the union class) by their names as given (a union net's
    with its `#MODE`, which picks the class of a hub id), on `device` in `dtype`."""
    import diffusers

    assert info.controlnet_class is not None
    loaded: dict[str, Any] = {}
    for given in models:
        name, mode = split_mode(given)
        check_controlnet_class(name, info, mode)
        cls = getattr(diffusers, controlnet_class(name, info, mode))
        path = Path(name).expanduser()
        try:
            model = cls.from_pretrained(str(path) if path.exists() else name, dtype=dtype)
        except Exception as e:
            first = first_line(e, 200)
            raise GigadiffError(f"{{control}}: cannot load ControlNet {name!r} for {info.family}: {first}",
                                "control") from e  # fmt: skip
        loaded[name] = model.to(device).eval()
    return loaded


def prepare_controls(specs: list[ControlSpec], models: dict[str, Any], processor: Any, canvas_px: tuple[int, int],
                     device: Any, dtype: Any) -> tuple[Control, ...]:  # fmt: skip
    """Each spec's image resized to the canvas (h, w) by the pipeline's control image processor."""
    from gigadiff.io.images import open_image

    controls = []
    for spec in specs:
        if spec.model not in models:
            raise GigadiffError(f"{{control}}: ControlNet {spec.model!r} was not loaded with the model", "control")
        with open_image(spec.image) as im:
            image = processor.preprocess(im.convert("RGB"), height=canvas_px[0], width=canvas_px[1])
        controls.append(Control(models[spec.model], image.to(device, dtype), spec.scale, spec.start, spec.end,
                                spec.mode))  # fmt: skip
    return tuple(controls)
