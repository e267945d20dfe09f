"""Writing a finished run: the image (streamed from the tiled VAE, or a heightmap), its sidecar and latents.

Every file goes through a temporary file renamed into place (gigadiff.io.files), so an interrupted run leaves
nothing half-written, and an existing file is never replaced without `overwrite`. The run's checkpoint is
removed once the outputs that supersede it are in place.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING

from gigadiff import interrupts
from gigadiff.io.heightmap import write_heightmap
from gigadiff.io.images import tensor_to_pil
from gigadiff.io.streaming import write_streamed
from gigadiff.io.writers import write_latent, write_png
from gigadiff.progress import plural

if TYPE_CHECKING:
    from gigadiff.events import Listener
    from gigadiff.runs.resolve import Outputs
    from gigadiff.runs.result import GenerationResult


def write_results(result: GenerationResult, outputs: Outputs, overwrite: bool, started: float,
                  listener: Listener) -> str:  # fmt: skip
    """Write the outputs of `result`; returns the one-line summary the command line prints."""
    with interrupts.final_outputs():  # once the image is in place, the others follow
        meta = result.metadata
        codec = result.backend.codec
        if result.info.output == "heightmap":
            listener.on_phase("writing heightmap and relief", None)
            meta = write_heightmap(result.decode()[0, 0].numpy(), outputs.image, meta, overwrite)
        elif codec.streams:
            h, w = result.latents.shape[2:]
            f = result.info.vae_scale_factor
            decode = partial(codec.stream_decode, result.latents, tiling=result.vae, listener=listener)
            write_streamed(decode, outputs.image, w * f, h * f, meta, overwrite, listener)
        else:
            write_png(tensor_to_pil(result.decode())[0], outputs.image, meta, overwrite)
        if outputs.latent is not None:
            write_latent(result.latents, outputs.latent, meta, overwrite)
        if outputs.checkpoint is not None and outputs.checkpoint.exists():
            outputs.checkpoint.unlink()  # the finished outputs supersede this run's checkpoint
    s = result.settings
    vae = f", VAE {result.vae_mode}" if result.vae_mode else ""
    written = ", ".join(str(p) for p in outputs.finished() if p.exists())
    return (
        f"wrote {written} ({s.width}x{s.height}, seed {s.seed}, {plural(s.steps or 0, 'step')}, "
        f"{result.run.tiles_per_step} tiles/step, {plural(result.run.model_calls, 'model call')}{vae}) in "
        f"{time.perf_counter() - started:.1f}s"
    )
