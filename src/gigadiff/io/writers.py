"""Writers for the final results: PNG with embedded parameters plus a JSON sidecar, and latent canvases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from gigadiff.io.files import publish, sidecar_path
from gigadiff.io.metadata import parameters_text, to_json

if TYPE_CHECKING:
    import torch


def png_info(meta: dict[str, Any]) -> PngInfo:
    """PNG text chunks: `parameters` (human-readable) and `gigadiff` (the metadata as JSON)."""
    info = PngInfo()
    info.add_text("parameters", parameters_text(meta))
    info.add_text("gigadiff", json.dumps(meta, sort_keys=True))
    return info


def write_sidecar(path: Path, meta: dict[str, Any], overwrite: bool = False) -> None:
    publish(sidecar_path(path), lambda tmp: tmp.write_text(to_json(meta) + "\n"), overwrite)


def write_png(image: Image.Image, path: Path, meta: dict[str, Any], overwrite: bool = False) -> None:
    """PNG with the metadata in its text chunks, and a JSON sidecar."""
    info = png_info(meta)
    publish(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite)
    write_sidecar(path, meta, overwrite)


def png_metadata(image: Image.Image) -> dict[str, Any]:
    """The metadata written by `png_info`, from an open PNG."""
    text = getattr(image, "text", None)  # a PNG's text chunks (PIL's PngImageFile)
    if not isinstance(text, dict) or "gigadiff" not in text:
        raise ValueError("the image carries no gigadiff metadata")
    return json.loads(text["gigadiff"])


def read_png_metadata(path: Path) -> dict[str, Any]:
    with Image.open(path) as im:
        return png_metadata(im)


def write_latent(latents: torch.Tensor, path: Path, meta: dict[str, Any], overwrite: bool = False) -> None:
    """The latent canvas as safetensors (tensor "latent"), with the generation metadata as JSON."""
    import torch
    from safetensors.torch import save_file

    tensor = latents.detach().to("cpu", torch.float32).contiguous()
    header = {"gigadiff": json.dumps(meta)}
    publish(path, lambda tmp: save_file({"latent": tensor}, str(tmp), metadata=header), overwrite)


def read_latent(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("gigadiff", "{}"))
        return f.get_tensor("latent"), meta
