"""Executing a resolved run: load (or reuse) the model, check the decode, denoise, write the outputs.

Every front end ends here: the command line with a progress bar, `gigadiff.generate` with its listener, the
service's worker with its job events. The backend is never changed by a run (the VAE settings travel with the
run), so one loaded model serves any number of runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from gigadiff import interrupts
from gigadiff.errors import GigadiffError
from gigadiff.events import Listeners
from gigadiff.executors.launch import Ranks, init_from_env, rank_device
from gigadiff.executors.local import LocalExecutor, TileExecutor
from gigadiff.recipes.context import CanvasRun, CheckpointPolicy, RunContext
from gigadiff.runs.outputs import write_results
from gigadiff.runs.preview import PreviewWriter
from gigadiff.runs.result import GenerationResult

if TYPE_CHECKING:
    from gigadiff.backends.base import Backend
    from gigadiff.checkpoint import Checkpoint
    from gigadiff.runs.resolve import Run


def denoise(ctx: RunContext) -> CanvasRun:
    """Run the recipe the settings call for (plain, img2img, regional: txt2img; progressive: coherence).

    With `ctx.resume`, the run continues from the checkpoint, after checking that it was made by this model.
    """
    resume, info = ctx.resume, ctx.backend.info
    if resume is not None and resume.fingerprint != info.fingerprint:
        raise GigadiffError(
            f"checkpoint was made with model {resume.model!r} (fingerprint {resume.fingerprint}); the loaded model "
            f"{info.name!r} has fingerprint {info.fingerprint}: refusing to resume on another model"
        )
    if ctx.settings.coherence == "progressive":
        from gigadiff.recipes.coherence import progressive

        return progressive(ctx)
    from gigadiff.recipes.txt2img import text_to_image

    return text_to_image(ctx)


def make_executor(tile_batch: int, ranks: Ranks, timeout_s: float, cfg_split: bool = False) -> TileExecutor:
    from gigadiff.executors.distributed import DistributedExecutor

    if ranks.distributed:
        return DistributedExecutor(tile_batch, timeout_s=timeout_s, cfg_split=cfg_split)
    return LocalExecutor(tile_batch)


def fitted(run: Run, device: str) -> tuple[Run, str | None]:
    """The run as its memory plan on `device` places it (gigadiff.runs.plan.fit), and the offload mode to load
    with; on a GPU only (elsewhere the run as it is, and None: `--offload` as asked)."""
    if not (run.info.diffusers_weights and run.source.root is not None and _on_gpu(device)):
        return run, None
    from gigadiff.runs.plan import fit

    run, plan = fit(run, device)
    return run, plan.offload


def load(run: Run, ranks: Ranks, offload: str | None = None) -> Backend:
    """The run's model, loaded on this rank's device, its weights placed by `offload` (the plan's mode, from
    `fitted`; None: `--offload` as asked)."""
    loading = run.loading(rank_device(run.request.device, ranks))
    if run.request.upscaler is not None:  # a file spandrel cannot read is refused before the model's weights load
        from gigadiff.backends.upscaler import load_upscaler

        load_upscaler(run.request.upscaler, "cpu")
    if offload is not None:
        loading = replace(loading, offload=offload)
    return run.family.load(run.source, run.info, loading)


def _on_gpu(device: str) -> bool:
    import torch

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


@dataclass(frozen=True)
class Executed:
    """What `execute` did: the result, the executor that ran it (for its profile) and, when the outputs were
    written, the one-line summary."""

    result: GenerationResult
    executor: TileExecutor
    summary: str = ""


def context(run: Run, backend: Backend, listener: Any, ranks: Ranks, resume: Checkpoint | None) -> RunContext:
    """The run as its recipe receives it: executor, listeners (the caller's, the preview), checkpoint policy."""
    request, settings = run.request, run.settings
    if request.cfg_split and not ranks.distributed:
        raise GigadiffError("{cfg_split} shares guidance passes between processes: launch with torchrun or give "
                            "{processes}", "cfg_split", "processes")  # fmt: skip
    executor = make_executor(settings.tile_batch, ranks, request.rank_timeout, request.cfg_split)
    policy = None
    if run.outputs.checkpoint is not None:
        policy = CheckpointPolicy(run.outputs.checkpoint, request.checkpoint_every, run.record(), write=ranks.is_main)
    preview = None
    if run.outputs.preview is not None and ranks.is_main:
        preview = PreviewWriter(backend.codec, run.outputs.preview)
    return RunContext(backend, settings, executor, Listeners(preview, listener), run.vae, policy, resume)


def execute(
    run: Run,
    backend: Backend | None = None,
    listener: Any = None,
    ranks: Ranks | None = None,
    resume: Checkpoint | None = None,
    write: bool = True,
    on_loaded: Any = None,
) -> Executed:
    """Load (unless `backend` is given), check, denoise and, with `write`, write the run's outputs on rank 0.

    `listener` hears the run's events (any of gigadiff.events.EVENTS it implements); `on_loaded()` is called
    once the model is in memory (progress displays switch phase there).
    """
    request = run.request
    interrupts.note_checkpoint(run.outputs.checkpoint)
    ranks = ranks or init_from_env(request.device, request.rank_timeout)
    started = time.perf_counter()
    if backend is None:
        run, offload = fitted(run, rank_device(request.device, ranks))
        backend = load(run, ranks, offload)
    if on_loaded is not None:
        on_loaded()
    settings = run.settings
    vae_mode = backend.codec.check(1, settings.height, settings.width, run.vae)  # fails now, not after hours
    ctx = context(run, backend, listener, ranks, resume)
    canvas = denoise(ctx)
    told = tuple(note.render() for note in run.notes)
    result = GenerationResult(canvas.latents, settings, backend, canvas, run.vae, run.record(), vae_mode, told)
    summary = ""
    if write and ranks.is_main:
        summary = write_results(result, run.outputs, request.overwrite, started, ctx.events)
    return Executed(result, ctx.executor, summary)


__all__ = ["Executed", "GenerationResult", "denoise", "execute"]
