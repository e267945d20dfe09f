"""The Python API: `gigadiff.generate(...)`, with the same options as the command line.

    import gigadiff
    image = gigadiff.generate("a lighthouse at dawn", model="sdxl", size="4096x2048", seed=7)
    image.save("lighthouse.png")

Keyword arguments are the fields of `gigadiff.options.RunRequest` (the command line's options with
underscores: negative, tile_batch, vae_mode, regions, init, ...); the request is resolved and executed by the
run layer like the command line's. `model` may also be a loaded diffusers pipeline or a backend from
`open_backend` (used as it is, on its own device and dtype). With `output`, the files are written as the
command line writes them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gigadiff.errors import GigadiffError
from gigadiff.options import FIELD_NAMES, RunRequest, check_types

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from gigadiff.backends.base import Backend
    from gigadiff.checkpoint import Checkpoint
    from gigadiff.events import Listener
    from gigadiff.runs.execute import GenerationResult


def open_backend(model: str | Any, device: str = "auto", dtype: str = "auto", **loading: Any) -> Backend:
    """Load `model` once; pass the result as `model=` to several `generate` calls to reuse it (`loading`:
    `offload`, `quantize`, `transformer` as on the command line)."""
    from gigadiff.backends.registry import load_backend

    if isinstance(model, str) or _is_pipeline(model):
        return load_backend(model, device, dtype, **loading)
    return model  # already a backend


def _is_pipeline(model: Any) -> bool:
    return hasattr(model, "components") and hasattr(model, "scheduler")


def generate_result(prompt: str = "", *, model: str | Any = "sd15", listener: Listener | None = None,
                    **fields: Any) -> GenerationResult:  # fmt: skip
    """Like `generate`, but returns the whole `GenerationResult` (latents, resolved settings, metadata)."""
    unknown = sorted(set(fields) - set(FIELD_NAMES))
    if unknown:
        raise GigadiffError(f"generate() got unknown option(s) {', '.join(unknown)}; options are the fields of "
                            f"RunRequest: {', '.join(FIELD_NAMES)}")  # fmt: skip
    if isinstance(fields.get("size"), tuple | list):  # (width, height), as Python callers like to pass it
        fields["size"] = "{}x{}".format(*fields["size"])
    backend = None if isinstance(model, str) else open_backend(model)
    name = model if backend is None else backend.info.name
    request = RunRequest(**check_types({**fields, "prompt": prompt, "model": name}, "generate()"))
    return _run(request, backend, listener)


def resume_result(checkpoint: str | Path, *, model: str | Any | None = None, listener: Listener | None = None,
                  **changes: Any) -> GenerationResult:  # fmt: skip
    """Continue the run a checkpoint records (`gigadiff resume` in Python) to the same final image; `changes`
    are the options resume may change (output, device, ...). `model`: the run's model, loaded (default: the
    model the record names, loaded here)."""
    from gigadiff.checkpoint import load_checkpoint
    from gigadiff.options import RESUME_OPTIONS

    refused = sorted(set(changes) - set(RESUME_OPTIONS))
    if refused:
        raise GigadiffError(f"resume_result() cannot change {', '.join(refused)}: a resumed run is the recorded "
                            f"one (it may change {', '.join(RESUME_OPTIONS)})")  # fmt: skip
    ckpt = load_checkpoint(Path(checkpoint))
    request = RunRequest.from_dict(ckpt.record, f"checkpoint {checkpoint}")
    backend = None if model is None or isinstance(model, str) else open_backend(model)
    request = request.replace(checkpoint=str(checkpoint), **check_types(changes, "resume_result()"))
    return _run(request, backend, listener, ckpt)


def _run(request: RunRequest, backend: Backend | None, listener: Listener | None,
         resume: Checkpoint | None = None) -> GenerationResult:  # fmt: skip
    """Resolve and execute `request` (on `backend` when given); files are written only where an output is named."""
    from gigadiff.backends.registry import described_backend
    from gigadiff.runs.execute import execute
    from gigadiff.runs.resolve import resolve

    described = described_backend(backend) if backend is not None else None
    write = request.output is not None
    run = resolve(request, described=described, writes=write, resuming=resume is not None)
    for note in run.notes:
        warnings.warn(note.render(), UserWarning, stacklevel=3)
    return execute(run, backend, listener, resume=resume, write=write).result


OUTPUT_TYPES = ("pil", "latent", "heights")


def generate(prompt: str = "", *, model: str | Any = "sd15", output_type: str = "pil",
             listener: Listener | None = None,
             **fields: Any) -> Image.Image | torch.Tensor | np.ndarray:  # fmt: skip
    """Generate one image; returns a PIL image (a heightmap model's shaded relief) carrying the generation
    metadata in `image.info` ("parameters", "gigadiff"); with output_type="latent" the final canvas; with
    "heights" (heightmap models) the heights in metres as a float32 array [H, W]."""
    if output_type not in OUTPUT_TYPES:
        raise GigadiffError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if output_type == "heights":
        from gigadiff.backends.registry import find_model

        info = find_model(model)[2] if isinstance(model, str) else open_backend(model).info
        if info.output != "heightmap":
            raise GigadiffError(f"output_type 'heights' is for heightmap models; model {info.name!r} paints images")
    result = generate_result(prompt, model=model, listener=listener, **fields)
    if output_type == "heights":
        return result.decode()[0, 0].numpy()
    return result.latents if output_type == "latent" else result_image(result)


def result_image(result: GenerationResult) -> Image.Image:
    """The picture to look at, with the metadata the command line's files carry in `image.info`."""
    import json

    from PIL import Image

    from gigadiff.io.images import tensor_to_pil
    from gigadiff.io.metadata import parameters_text
    from gigadiff.io.relief import shaded_relief

    decoded = result.decode()
    if result.info.output == "heightmap":
        image = Image.fromarray(shaded_relief(decoded[0, 0].numpy()))
    else:
        image = tensor_to_pil(decoded)[0]
    meta = result.metadata
    image.info.update({"parameters": parameters_text(meta), "gigadiff": json.dumps(meta, sort_keys=True)})
    return image


__all__ = ["generate", "generate_result", "open_backend", "result_image", "resume_result"]
