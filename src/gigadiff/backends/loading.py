"""Turning what the user wrote after `--model` into a ready backend.

`--model` accepts `terrain` (the offline ONNX terrain model), a preset alias (sd15, sdxl, ...), a Hugging Face
hub id, a local diffusers folder, or a single-file checkpoint (.safetensors / .ckpt). The local cache is tried
first so that an offline machine that has the model never touches the network; a model that is neither cached
nor downloadable fails at once with a message naming the model and the ways to provide it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from gigadiff.backends.base import Backend
from gigadiff.backends.device import resolve_device, resolve_dtype
from gigadiff.backends.diffusers_unet import DiffusersUNetBackend, is_unet_pipeline
from gigadiff.backends.presets import PRESETS, ModelPreset
from gigadiff.errors import GigadiffError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def _missing_model_message(model: str, repo: str, cause: BaseException) -> str:
    shown = model if model == repo else f"{model} ({repo})"
    return (
        f"cannot load model {shown}: it is not in the local Hugging Face cache and could not be downloaded "
        f"({type(cause).__name__}: {str(cause).splitlines()[0][:200]}). "
        f"Download it on a connected machine with `hf download {repo}` and copy the cache "
        "(HF_HOME), or pass --model /path/to/a/diffusers/folder or a .safetensors checkpoint"
    )


def _is_sdxl_checkpoint(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("conditioner.embedders.1") for k in f.keys())  # noqa: SIM118


def _load_single_file(path: Path, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if _is_sdxl_checkpoint(path) else StableDiffusionPipeline
    try:
        return cls.from_single_file(str(path), dtype=dtype)
    except Exception as e:  # the config lookup needs the hub unless it is cached
        raise GigadiffError(
            f"cannot load checkpoint {path} as {cls.__name__}: {str(e).splitlines()[0][:200]}. "
            "Single-file checkpoints need their model's config from the hub cache; convert it to a diffusers "
            "folder on a connected machine, or pass that folder with --model"
        ) from e


def _load_pretrained(source: str, dtype: torch.dtype, model: str) -> Any:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=True)
    except Exception as cached_error:
        if Path(source).exists():
            raise GigadiffError(
                f"cannot load model from {source}: {str(cached_error).splitlines()[0][:300]}"
            ) from cached_error
        if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            raise GigadiffError(_missing_model_message(model, source, cached_error)) from cached_error
    try:
        return DiffusionPipeline.from_pretrained(source, dtype=dtype)
    except Exception as e:
        raise GigadiffError(_missing_model_message(model, source, e)) from e


def looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).exists()


def load_pipeline(model: str, dtype: torch.dtype) -> tuple[Any, ModelPreset | None]:
    """Load a diffusers pipeline (on the CPU) for `model`, and the preset it came from if any."""
    preset = PRESETS.get(model)
    if preset is not None:
        return _load_pretrained(preset.repo, dtype, model), preset
    path = Path(model).expanduser()
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise GigadiffError(f"checkpoint file {path} does not exist")
        return _load_single_file(path, dtype), None
    if looks_like_path(model) and not path.exists():
        raise GigadiffError(f"model folder {path} does not exist")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise GigadiffError(f"{path} is not a diffusers model folder (it has no model_index.json)")
    if not path.exists() and model.count("/") != 1:
        known = ", ".join(["terrain", *sorted(PRESETS)])
        raise GigadiffError(
            f"unknown model {model!r}: not a preset ({known}), not a local folder or checkpoint, "
            "and not a hub id of the form owner/name"
        )
    return _load_pretrained(str(path) if path.exists() else model, dtype, model), None


def backend_for_pipeline(pipe: Any, name: str = "", preset: ModelPreset | None = None) -> DiffusersUNetBackend:
    if not is_unet_pipeline(pipe):
        raise GigadiffError(
            f"model {name or type(pipe).__name__!r} loads as {type(pipe).__name__}; gigadiff's backends "
            "support Stable Diffusion 1.x/2.x and SDXL UNet pipelines"
        )
    return DiffusersUNetBackend(pipe, name=name, preset=preset)


def load_backend(model: str | Any, device: str = "auto", dtype: str = "fp32") -> Backend:
    """A backend for `model` (a name/path, or an already-loaded diffusers pipeline, used where it is)."""
    if not isinstance(model, str):
        return backend_for_pipeline(model)
    if model == "terrain":
        from gigadiff.backends.terrain import TerrainBackend

        if dtype != "fp32":
            raise GigadiffError("model 'terrain' is an fp32 ONNX model; use --dtype fp32")
        return TerrainBackend(device=device)
    torch_device = resolve_device(device)
    pipe, preset = load_pipeline(model, resolve_dtype(dtype, torch_device))
    pipe.set_progress_bar_config(disable=True)
    return backend_for_pipeline(pipe.to(torch_device), name=model, preset=preset)
