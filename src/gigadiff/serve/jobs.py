"""A service job's request: the client's JSON checked and completed into the run layer's `RunRequest`.

Clients use `generate`'s option names (underscores for dashes) but never name a file on the server: outputs,
checkpoints and previews are the server's (in the job's folder), an init image or a region mask comes as a
`data:image/...;base64,` URL, and a model is a preset, a hub id (owner/name) or the name of a folder in the
server's allow-listed models folder. Limits (canvas side, steps, processes) are the server's. A request is
checked as the command line checks it, before it is queued: a bad one gets the command line's message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gigadiff.errors import GigadiffError
from gigadiff.options import CLIENT_OPTIONS, FIELD_NAMES, SERVER_OPTIONS, RunRequest, check_types, flag
from gigadiff.serve.config import ServeConfig

if TYPE_CHECKING:
    from gigadiff.runs.resolve import Run

IMAGE = "image.tif"
"""A job's output: a BigTIFF pyramid (a heightmap's is float32 heights, with its relief beside it)."""
RELIEF_VIEW = "image.relief.tif"
"""The pyramid the worker makes of a heightmap's shaded relief, for the Deep Zoom view."""
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def view_name(outputs: list[str]) -> str:
    """The output a job's Deep Zoom view reads."""
    return RELIEF_VIEW if RELIEF_VIEW in outputs else IMAGE


def message(error: GigadiffError) -> str:
    """The command line's message for an error (fields written as its flags)."""
    return error.render(flag)


def _model(name: Any, config: ServeConfig) -> str:
    from gigadiff.backends.registry import builtin_names, presets

    if not isinstance(name, str):
        raise GigadiffError("{model} must be a preset, a hub id or a model of the server's models folder", "model")
    if name in presets() or name in builtin_names():
        return name
    folder = models_folder_entry(name, config)
    if folder is not None:
        return str(folder)
    if _HUB_ID.match(name) and ".." not in name:
        return name
    known = ", ".join([*builtin_names(), *sorted(presets())])
    local = f", or a model in the server's models folder ({', '.join(local_models(config))})" if config.models else ""
    raise GigadiffError(f"unknown {{model}} {name!r}: use a preset ({known}), a hub id owner/name{local}", "model")


def models_folder_entry(name: str, config: ServeConfig) -> Path | None:
    """The folder `name` (a bare name, never a path) of the server's models folder, or None."""
    if config.models is None or not _MODEL_NAME.match(name) or not (config.models / name).is_dir():
        return None
    return config.models / name


WEIGHT_FILES = (".gguf", ".safetensors")
"""The single weight files a job may name from the server's models folder."""


def models_file(name: Any, config: ServeConfig, field: str, suffixes: tuple[str, ...]) -> str:
    """The path of file `name` (a bare file name, never a path) in the server's models folder, or an error that
    lists the folder's files of that kind and names no server path."""
    folder = config.models
    files = sorted(p.name for p in folder.iterdir() if p.suffix in suffixes and p.is_file()) if folder else []
    if folder is not None and isinstance(name, str) and _MODEL_NAME.match(name) and name in files:
        return str(folder / name)
    kinds = "/".join(suffixes)
    have = f": {', '.join(files)}" if files else f" (it has no {kinds} files)" if config.models else ""
    where = "the server's models folder" if config.models else "a models folder, and this server has none"
    raise GigadiffError(f"{{{field}}} must name a {kinds} file of {where}{have}", field)


MAX_LORAS = 16
"""LoRAs one job may stack (people use a handful)."""


MAX_CONTROLS = 4
"""ControlNets one job may stack."""


def _control(item: Any, index: int, folder: Path, config: ServeConfig) -> str:
    """A job's `NAME[#MODE]=data:image/...[:SCALE[:START:END]]`: the ControlNet a folder of the models folder (a
    union net's mode kept), its image written into the job's folder (held to the side limit first)."""
    from gigadiff.backends.control import parse_control
    from gigadiff.io.images import data_url_bytes

    if not isinstance(item, str):
        raise GigadiffError("{control} items are strings: NAME=data:image/...;base64,...[:SCALE[:START:END]]",
                            "control")  # fmt: skip
    spec = parse_control(item)
    net = models_folder_entry(spec.model, config)
    if net is None:
        names = sorted(p.name for p in config.models.iterdir() if p.is_dir()) if config.models else []
        raise GigadiffError(f"{{control}} must name a ControlNet folder of the server's models folder "
                            f"({', '.join(names) or 'none'})", "control")  # fmt: skip
    what = f"{{control}} {spec.model}: image"
    data = data_url_bytes(spec.image, what, "control")
    _within_side(data, what, "control", config)
    path = folder / f"control{index}.png"
    path.write_bytes(data)
    mode = "" if spec.mode is None else f"#{spec.mode}"
    return f"{net}{mode}={path}:{spec.scale:g}:{spec.start:g}:{spec.end:g}"


def _lora(item: Any, config: ServeConfig) -> str:
    """A job's `NAME[:SCALE]` as the server's file with its scale."""
    from gigadiff.backends.lora import parse_lora

    if not isinstance(item, str):
        raise GigadiffError("{lora} items are strings: NAME.safetensors[:SCALE]", "lora")
    lora = parse_lora(item)
    return f"{models_file(lora.path, config, 'lora', ('.safetensors',))}:{lora.scale:g}"


def local_models(config: ServeConfig) -> list[str]:
    if config.models is None:
        return []
    return sorted(p.name for p in config.models.iterdir() if (p / "model_index.json").is_file())


def _within_side(data: bytes, what: str, field: str, config: ServeConfig) -> None:
    """An image's size from its header, held to the server's side limit before anything decodes its pixels (a
    few bytes of PNG can declare 65536x65536)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception as e:
        raise GigadiffError(f"{what} cannot be read as an image ({type(e).__name__})", field) from None
    _held_to_side(max(width, height), f"{what} is {width}x{height},", config, field)


def _held_to_side(side: float, said: str, config: ServeConfig, *fields: str) -> None:
    """Refuse a picture side above the server's limit; `said` names what has it ("{size} 512x70000 is")."""
    if side > config.max_side:
        raise GigadiffError(f"{said} above this server's limit of {config.max_side} px a side", *fields)


def _init_image(value: Any, folder: Path, config: ServeConfig) -> str:
    from gigadiff.io.images import data_url_bytes

    data = data_url_bytes(value, "{init}", "init")
    _within_side(data, "{init}", "init", config)
    path = folder / "init.png"
    path.write_bytes(data)
    return str(path)


def _check_masks(regions: Any, config: ServeConfig) -> None:
    """Every region mask given as a data URL, held to the side limit before the run layer decodes it."""
    from gigadiff.io.images import data_url_bytes
    from gigadiff.regions import MAX_REGIONS

    items = regions.get("regions") if isinstance(regions, dict) else regions
    if not isinstance(items, list):
        return  # the run layer names what is wrong with it
    for i, item in enumerate(items[: MAX_REGIONS + 1], 1):
        if isinstance(item, dict) and isinstance(item.get("mask"), str) and item["mask"].startswith("data:"):
            what = f"{{regions}}, region {i}: mask"
            _within_side(data_url_bytes(item["mask"], what, "regions"), what, "regions", config)


def _check_size(fields: dict[str, Any], config: ServeConfig) -> None:
    """The canvas a request asks for, held to the server's limit before anything the size scales is made (region
    masks are resized to the canvas)."""
    from gigadiff.runs.checks import parse_size

    if isinstance(fields.get("size"), str):
        width, height = parse_size(fields["size"])
        _held_to_side(max(width, height), f"{{size}} {width}x{height} is", config, "size")


def job_request(data: Any, config: ServeConfig, folder: Path, device: str = "auto") -> RunRequest:
    """The run request of a job whose files go to `folder` (created if needed)."""
    if not isinstance(data, dict):
        raise GigadiffError("a job is a JSON object of generate's options, e.g. {\"prompt\": \"...\", \"size\": "
                            "\"2048x1024\"}")  # fmt: skip
    own = sorted(set(data) & set(SERVER_OPTIONS))
    if own:
        raise GigadiffError(f"option(s) {', '.join(own)} are set by the server, not by a job")
    fields = dict(check_types({k: v for k, v in data.items() if k in FIELD_NAMES}, "job"))
    unknown = sorted(set(data) - set(FIELD_NAMES))
    if unknown:
        raise GigadiffError(f"unknown option(s) {', '.join(unknown)} (options: {', '.join(CLIENT_OPTIONS)})")
    fields["model"] = _model(fields.get("model", "sd15"), config)
    if fields.get("transformer") is not None:
        fields["transformer"] = models_file(fields["transformer"], config, "transformer", WEIGHT_FILES)
    if fields.get("upscaler") is not None:
        from gigadiff.backends.upscaler import UPSCALER_FILES

        fields["upscaler"] = models_file(fields["upscaler"], config, "upscaler", UPSCALER_FILES)
    if fields.get("lora") is not None:
        if len(fields["lora"]) > MAX_LORAS:
            raise GigadiffError(f"{{lora}}: at most {MAX_LORAS} LoRAs a job", "lora")
        fields["lora"] = [_lora(item, config) for item in fields["lora"]]
    _check_size(fields, config)
    if fields.get("regions") is not None:
        _check_masks(fields["regions"], config)
    folder.mkdir(parents=True, exist_ok=True)
    if fields.get("control") is not None:
        items = fields["control"]
        if len(items) > MAX_CONTROLS:
            raise GigadiffError(f"{{control}}: at most {MAX_CONTROLS} ControlNets a job", "control")
        fields["control"] = [_control(item, i, folder, config) for i, item in enumerate(items)]
    if fields.get("init") is not None:
        fields["init"] = _init_image(fields["init"], folder, config)
        if fields.get("size") is None:  # the canvas is the init image's size times the scale
            from gigadiff.io.images import image_size

            width, height = image_size(fields["init"])
            scale = float(fields.get("scale") or 1.0)
            _held_to_side(max(width, height) * scale, f"{{init}} ({width}x{height}) times {{scale}} {scale:g} is",
                         config, "init", "scale")  # fmt: skip
    if fields.get("processes", 1) > config.max_processes:
        raise GigadiffError(f"{{processes}} {fields['processes']} is above this server's limit of "
                            f"{config.max_processes}", "processes")  # fmt: skip
    return RunRequest(**fields, output=str(folder / IMAGE), preview=str(folder / "preview.png"),
                      checkpoint_every=config.checkpoint_every, checkpoint=str(folder / "checkpoint.safetensors"),
                      quiet=True, device=device, overwrite=True)  # fmt: skip


def resolve_job(data: Any, config: ServeConfig, folder: Path, device: str = "auto", **options: Any) -> Run:
    """A job's request resolved as the command line resolves it (`options` go to `resolve`), then held to the
    server's limits on what the run resolved to (a model's default size and steps count too)."""
    from gigadiff.backends.registry import find_model
    from gigadiff.backends.source import ModelUnavailable
    from gigadiff.runs.resolve import resolve

    request = job_request(data, config, folder, device)
    local = config.models is not None and Path(request.model).parent == config.models
    try:  # only the models folder's entries are paths; a hub id is never read as a path where the server runs
        run = resolve(request, check_files=False, described=find_model(request.model, paths=local), **options)
    except ModelUnavailable as e:  # the command line's advice (pass a path) does not apply to a client
        raise e.for_server(config.models) from None
    width, height, steps = run.settings.width, run.settings.height, run.settings.steps
    assert width and height and steps
    _held_to_side(max(width, height), f"{{size}} {width}x{height} is", config, "size")
    if steps > config.max_steps:
        raise GigadiffError(f"{{steps}} {steps} is above this server's limit of {config.max_steps}", "steps")
    return run


def validate(data: Any, config: ServeConfig) -> dict[str, Any]:
    """Check a job as the command line would, before it is queued (raises GigadiffError; no torch); returns the
    job with its seed drawn if it had none, so that the job, its page and a resumed run all know it."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        run = resolve_job(data, config, Path(folder), allow_files=False)
        return {**data, "seed": run.settings.seed}
