"""The Python API: `gigadiff.generate(...)`, and the pieces the CLI shares with it.

    import gigadiff
    image = gigadiff.generate("a lighthouse at dawn", model="sdxl", size="4096x2048", seed=7)
    image.save("lighthouse.png")

`model` may be a preset alias, a hub id, a local folder, a checkpoint file, or an already-loaded diffusers
pipeline (which is used as it is, on its own device and dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from gigadiff.backends.base import Backend, ModelInfo
from gigadiff.backends.loading import load_backend
from gigadiff.checkpoint import Checkpoint
from gigadiff.errors import GigadiffError
from gigadiff.executors.local import LocalExecutor, TileExecutor
from gigadiff.io.images import image_size, tensor_to_pil
from gigadiff.io.metadata import generation_metadata
from gigadiff.io.relief import shaded_relief
from gigadiff.recipes.txt2img import CanvasRun, CheckpointPolicy, text_to_image
from gigadiff.sampler import StepListener
from gigadiff.settings import GenerationSettings, check_for_model, settings_from_options


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation: its latent canvas, the settings that made it, and what it cost."""

    latents: torch.Tensor
    settings: GenerationSettings
    backend: Backend
    run: CanvasRun

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    @property
    def metadata(self) -> dict[str, Any]:
        return generation_metadata(self.settings, self.info)

    def decode(self) -> torch.Tensor:
        return self.backend.decode(self.latents)

    def image(self) -> Image.Image:
        """The picture to look at: the decoded image, or for heightmap models their shaded relief."""
        decoded = self.decode()
        if self.info.output == "heightmap":
            return Image.fromarray(shaded_relief(decoded[0, 0].numpy()))
        return tensor_to_pil(decoded)[0]


SIZE_MULTIPLE = 8
"""Sizes derived from an init image are rounded to this (the VAE factor of every latent model gigadiff runs)."""


def init_size(path: str, scale: float = 1.0) -> tuple[int, int]:
    """(width, height) for a run from the image at `path` scaled by `scale`, rounded to SIZE_MULTIPLE."""
    if not scale > 0:
        raise GigadiffError(f"scale must be positive, got {scale}")
    width, height = image_size(path)
    return tuple(max(SIZE_MULTIPLE, round(v * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE) for v in (width, height))  # type: ignore[return-value]


def open_backend(model: str | Any, device: str = "auto", dtype: str = "fp32") -> Backend:
    """Load `model` once; pass the result as `model=` to several `generate` calls to reuse it."""
    if not isinstance(model, str) and hasattr(model, "info") and hasattr(model, "predict"):
        return model  # already a backend
    return load_backend(model, device, dtype)


def run_generation(
    settings: GenerationSettings,
    backend: Backend,
    executor: TileExecutor | None = None,
    listener: StepListener | None = None,
    checkpoints: CheckpointPolicy | None = None,
    resume: Checkpoint | None = None,
) -> GenerationResult:
    """Check `settings` against the model, then generate. Raises GigadiffError before any compute.

    With `resume`, the run continues from the checkpoint, after checking that it was made by this model.
    """
    resolved = check_for_model(settings, backend.info)
    if resume is not None and resume.fingerprint != backend.info.fingerprint:
        raise GigadiffError(
            f"checkpoint was made with model {resume.model!r} (fingerprint {resume.fingerprint}); the loaded model "
            f"{backend.info.name!r} has fingerprint {backend.info.fingerprint}: refusing to resume on another model"
        )
    if hasattr(backend, "vae_tiling"):  # a tileable image is decoded with the VAE's wrap-around too
        backend.vae_tiling = replace(backend.vae_tiling, wrap=resolved.wrap)
    executor = executor or LocalExecutor(resolved.tile_batch)
    if resolved.coherence == "progressive":
        if checkpoints is not None or resume is not None:
            raise GigadiffError("checkpoints are not supported with --coherence progressive yet; add --coherence none")
        from gigadiff.recipes.coherence import progressive

        run = progressive(backend, resolved, executor, listener)
    else:
        run = text_to_image(backend, resolved, executor, listener, checkpoints, resume)
    return GenerationResult(run.latents, resolved, backend, run)


def generate(
    prompt: str = "",
    *,
    model: str | Any,
    size: str | tuple[int, int] | None = None,
    negative_prompt: str = "",
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    scheduler: str = "default",
    tile: int | None = None,
    overlap: int | None = None,
    weights: str | None = None,
    shift: bool = True,
    level_sync: bool | None = None,
    tile_batch: int = 4,
    guidance_rescale: float = 0.0,
    eta: float = 0.0,
    tileable: str = "none",
    coherence: str = "auto",
    init_image: str | None = None,
    strength: float | None = None,
    sigmas: str | list[float] | None = None,
    device: str = "auto",
    dtype: str = "fp32",
    output_type: str = "pil",
    listener: StepListener | None = None,
    **options: Any,
) -> Image.Image | torch.Tensor:
    """Generate one image of `size` ("WIDTHxHEIGHT" or (width, height), in pixels).

    With `init_image` (a file), the canvas starts from that picture resized to `size` (default: its own size)
    and `strength` of it is repainted (img2img; upscaling when `size` is larger than the picture).
    Backend options go in `options` (e.g. difficulty=60 for model="terrain"). Returns a PIL image (for a
    heightmap model, its shaded relief), or with output_type="latent" the final canvas [1, C, H/f, W/f].
    """
    if output_type not in ("pil", "latent"):
        raise GigadiffError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
    if init_image is not None and size is None:
        size = init_size(init_image)
    settings = settings_from_options(
        prompt,
        size=size,
        seed=seed,
        sigmas=sigmas,
        options=options,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        scheduler=scheduler,
        tile=tile,
        overlap=overlap,
        weights=weights,
        shift=shift,
        level_sync=level_sync,
        tile_batch=tile_batch,
        guidance_rescale=guidance_rescale,
        eta=eta,
        tileable=tileable,
        coherence=coherence,
        init_image=init_image,
        strength=strength,
    )
    result = run_generation(settings, open_backend(model, device, dtype), listener=listener)
    return result.latents if output_type == "latent" else result.image()


__all__ = ["GenerationResult", "generate", "init_size", "open_backend", "run_generation"]
