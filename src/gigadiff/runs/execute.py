"""Executing a resolved run: load (or reuse) the model, check the decode, denoise, write the outputs.

Every front end ends here: the command line with a progress bar, `gigadiff.generate` with its listener, the
service's worker with its job events. The backend is never changed by a run (the VAE settings travel with the
run), so one loaded model serves any number of runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gigadiff import interrupts
from gigadiff.errors import GigadiffError
from gigadiff.executors.launch import Ranks, init_from_env, rank_device
from gigadiff.executors.local import LocalExecutor, TileExecutor
from gigadiff.io.metadata import generation_metadata
from gigadiff.recipes.txt2img import CanvasRun, CheckpointPolicy, text_to_image
from gigadiff.runs.preview import PreviewWriter
from gigadiff.sampler import Listeners, StepListener
from gigadiff.settings import GenerationSettings, check_for_model
from gigadiff.vae.tiling import VaeTiling

if TYPE_CHECKING:
    from gigadiff.backends.base import Backend
    from gigadiff.checkpoint import Checkpoint
    from gigadiff.runs.resolve import Run


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation: its latent canvas, the settings that made it, and what it cost."""

    latents: torch.Tensor
    settings: GenerationSettings
    backend: Backend
    run: CanvasRun
    vae: VaeTiling
    request: dict[str, Any] | None = None
    """The resolved run request, when the generation came through the run layer."""
    vae_mode: str = ""

    @property
    def info(self) -> Any:
        return self.backend.info

    @property
    def metadata(self) -> dict[str, Any]:
        return generation_metadata(self.settings, self.info, self.run.steps, self.request, self.vae_mode)

    def decode(self) -> torch.Tensor:
        return self.backend.codec.decode(self.latents, self.vae)


def denoise(
    settings: GenerationSettings,
    backend: Backend,
    executor: TileExecutor | None = None,
    listener: StepListener | None = None,
    checkpoints: CheckpointPolicy | None = None,
    resume: Checkpoint | None = None,
    vae: VaeTiling | None = None,
) -> CanvasRun:
    """Run the recipe `settings` call for (plain, img2img, regional, progressive) and return the canvas.

    With `resume`, the run continues from the checkpoint, after checking that it was made by this model.
    """
    if resume is not None and resume.fingerprint != backend.info.fingerprint:
        raise GigadiffError(
            f"checkpoint was made with model {resume.model!r} (fingerprint {resume.fingerprint}); the loaded model "
            f"{backend.info.name!r} has fingerprint {backend.info.fingerprint}: refusing to resume on another model"
        )
    vae = vae or VaeTiling(wrap=settings.wrap)
    assert settings.tile_batch is not None, "resolve first"
    executor = executor or LocalExecutor(settings.tile_batch)
    if settings.coherence == "progressive":
        from gigadiff.recipes.coherence import progressive

        return progressive(backend, settings, executor, listener, checkpoints, resume, vae)
    return text_to_image(backend, settings, executor, listener, checkpoints, resume, vae)


def run_generation(
    settings: GenerationSettings,
    backend: Backend,
    executor: TileExecutor | None = None,
    listener: StepListener | None = None,
    checkpoints: CheckpointPolicy | None = None,
    resume: Checkpoint | None = None,
) -> GenerationResult:
    """Check `settings` against the loaded model, then generate in memory (the API below the run layer)."""
    resolved = check_for_model(settings, backend.info)
    vae = VaeTiling(wrap=resolved.wrap)
    canvas = denoise(resolved, backend, executor, listener, checkpoints, resume, vae)
    return GenerationResult(canvas.latents, resolved, backend, canvas, vae)


def make_executor(tile_batch: int, ranks: Ranks, timeout_s: float, cfg_split: bool = False) -> TileExecutor:
    from gigadiff.executors.distributed import DistributedExecutor

    if ranks.distributed:
        return DistributedExecutor(tile_batch, timeout_s=timeout_s, cfg_split=cfg_split)
    return LocalExecutor(tile_batch)


def load(run: Run, ranks: Ranks) -> Backend:
    """The run's model, loaded on this rank's device."""
    return run.family.load(run.source, run.info, rank_device(run.request.device, ranks), run.request.dtype)


@dataclass(frozen=True)
class Executed:
    """What `execute` did: the result, the executor that ran it (for its profile) and, when the outputs were
    written, the one-line summary."""

    result: GenerationResult
    executor: TileExecutor
    summary: str = ""


def execute(
    run: Run,
    backend: Backend | None = None,
    listener: StepListener | None = None,
    ranks: Ranks | None = None,
    resume: Checkpoint | None = None,
    write: bool = True,
    on_loaded: Any = None,
) -> Executed:
    """Load (unless `backend` is given), check, denoise and, with `write`, write the run's outputs on rank 0.

    `on_loaded()` is called once the model is in memory (progress displays switch phase there).
    """
    request = run.request
    interrupts.note_checkpoint(run.outputs.checkpoint)
    ranks = ranks or init_from_env(request.device, request.rank_timeout)
    started = time.perf_counter()
    backend = backend or load(run, ranks)
    if on_loaded is not None:
        on_loaded()
    settings = run.settings
    assert settings.height and settings.width and settings.tile_batch
    vae_mode = backend.codec.check(1, settings.height, settings.width, run.vae)  # fails now, not after hours
    if request.cfg_split and not ranks.distributed:
        raise GigadiffError("{cfg_split} shares guidance passes between processes: launch with torchrun or give "
                            "{processes}", "cfg_split", "processes")  # fmt: skip
    executor = make_executor(settings.tile_batch, ranks, request.rank_timeout, request.cfg_split)
    policy = None
    if run.outputs.checkpoint is not None:
        policy = CheckpointPolicy(run.outputs.checkpoint, request.checkpoint_every, settings, run.record(),
                                  write=ranks.is_main)  # fmt: skip
    preview = None
    if run.outputs.preview is not None and ranks.is_main:
        preview = PreviewWriter(backend.codec, run.outputs.preview)
    canvas = denoise(settings, backend, executor, Listeners(listener, preview), policy, resume, run.vae)
    result = GenerationResult(canvas.latents, settings, backend, canvas, run.vae, run.record(), vae_mode)
    summary = ""
    if write and ranks.is_main:
        from gigadiff.runs.outputs import write_results

        summary = write_results(result, run.outputs, request.overwrite, started, listener)
    return Executed(result, executor, summary)


__all__ = ["Executed", "GenerationResult", "denoise", "execute", "run_generation"]
