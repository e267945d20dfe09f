"""Writers for the final results: PNG with embedded parameters plus a JSON sidecar, and latent canvases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from gigadiff.io.files import publish
from gigadiff.io.metadata import parameters_text, to_json


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar next to an output (used by every writer)."""
    return path.with_suffix(".json")


def write_png(image: Image.Image, path: Path, meta: dict[str, Any], overwrite: bool = False) -> None:
    """PNG with `parameters` (human-readable) and `gigadiff` (JSON) text chunks, and a JSON sidecar."""
    info = PngInfo()
    info.add_text("parameters", parameters_text(meta))
    info.add_text("gigadiff", json.dumps(meta, sort_keys=True))
    publish(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite)
    publish(sidecar_path(path), lambda tmp: tmp.write_text(to_json(meta) + "\n"), overwrite)


def read_png_metadata(path: Path) -> dict[str, Any]:
    with Image.open(path) as im:
        return json.loads(im.text["gigadiff"])  # type: ignore[attr-defined]


def write_latent(latents: torch.Tensor, path: Path, meta: dict[str, Any], overwrite: bool = False) -> None:
    """The latent canvas as safetensors (tensor "latent"), with the generation metadata as JSON."""
    from safetensors.torch import save_file

    tensor = latents.detach().to("cpu", torch.float32).contiguous()
    header = {"gigadiff": json.dumps(meta)}
    publish(path, lambda tmp: save_file({"latent": tensor}, str(tmp), metadata=header), overwrite)


def read_latent(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("gigadiff", "{}"))
        return f.get_tensor("latent"), meta
