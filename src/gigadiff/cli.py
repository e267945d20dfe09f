"""The `gigadiff` command line.

Every user error (bad size, missing model, existing output...) is reported in one line on stderr with exit
code 2, before any model is loaded where possible and always before the first denoising step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from gigadiff import __version__
from gigadiff.errors import GigadiffError

app = typer.Typer(
    name="gigadiff",
    help="Images of any size from diffusion models, by synchronized tiled denoising of one latent canvas.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

USER_ERROR = 2


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(USER_ERROR)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gigadiff {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """gigadiff command line."""


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to paint.")] = "",
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="terrain (offline), a preset (sd15, sd21, sdxl, sdxl-turbo), hub id, folder or file."
        ),
    ] = "sd15",
    size: Annotated[
        str | None,
        typer.Option(help="WIDTHxHEIGHT in pixels (default: the model's, e.g. 1024x1024 for sd15 and terrain)."),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output PNG (heightmaps: 16-bit PNG or float TIFF).")
    ] = Path("gigadiff.png"),
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the model's).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: a new random seed).")] = None,
    negative: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    scheduler: Annotated[str, typer.Option(help="default, ddim, euler, euler_a, dpmpp_2m, unipc, ...")] = "default",
    tile: Annotated[int | None, typer.Option(help="Tile side in image pixels (default: native size).")] = None,
    overlap: Annotated[int | None, typer.Option(help="Minimum tile overlap in image pixels (default: tile/8).")] = None,
    weights: Annotated[str, typer.Option(help="Fusion weights: uniform, gaussian or cosine.")] = "gaussian",
    shift: Annotated[bool, typer.Option("--shift/--no-shift", help="Move the tile grid at every step.")] = True,
    tile_batch: Annotated[int, typer.Option(help="Tiles per model call.")] = 4,
    guidance_rescale: Annotated[float, typer.Option(help="Guidance rescale factor in [0, 1].")] = 0.0,
    eta: Annotated[
        float, typer.Option(help="Noise kept vs drawn afresh per step (DDIM, consistency): 0 = deterministic.")
    ] = 0.0,
    sigmas: Annotated[
        str | None, typer.Option(help="Explicit decreasing noise levels, e.g. 80,2.5 (sets the steps).")
    ] = None,
    difficulty: Annotated[
        float | None, typer.Option(help="Terrain model only: terrain difficulty from 1 (gentle) to 100 (rugged).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cuda, mps or cpu.")] = "auto",
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16.")] = "fp32",
    save_latent: Annotated[
        Path | None, typer.Option(help="Also save the final latent canvas to this .safetensors file.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Generate an image of any size."""
    try:
        _generate(**locals())
    except GigadiffError as e:
        raise fail(str(e)) from None


def _generate(
    prompt: str,
    model: str,
    size: str | None,
    output: Path,
    steps: int | None,
    guidance: float | None,
    seed: int | None,
    negative: str,
    scheduler: str,
    tile: int | None,
    overlap: int | None,
    weights: str,
    shift: bool,
    tile_batch: int,
    guidance_rescale: float,
    eta: float,
    sigmas: str | None,
    difficulty: float | None,
    device: str,
    dtype: str,
    save_latent: Path | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    from gigadiff.io.files import check_outputs
    from gigadiff.io.heightmap import HEIGHTMAP_SUFFIXES, relief_path, write_heightmap
    from gigadiff.io.writers import sidecar_path
    from gigadiff.settings import settings_from_options

    settings = settings_from_options(
        prompt,
        size=size,
        seed=seed,
        sigmas=sigmas,
        options={"difficulty": difficulty} if difficulty is not None else None,
        negative_prompt=negative,
        steps=steps,
        guidance=guidance,
        scheduler=scheduler,
        tile=tile,
        overlap=overlap,
        weights=weights,
        shift=shift,
        tile_batch=tile_batch,
        guidance_rescale=guidance_rescale,
        eta=eta,
    )
    if output.suffix.lower() not in HEIGHTMAP_SUFFIXES:
        raise GigadiffError(f"output {output} must end in .png (or .tif for heightmaps)")
    if save_latent is not None and save_latent.suffix != ".safetensors":
        raise GigadiffError(f"--save-latent {save_latent} must end in .safetensors")
    outputs = [output, sidecar_path(output), *([save_latent] if save_latent else [])]
    check_outputs(outputs, overwrite)

    from gigadiff.api import open_backend, run_generation
    from gigadiff.io.writers import write_latent, write_png
    from gigadiff.progress import RichProgress
    from gigadiff.settings import check_for_model

    _quiet_libraries()
    started = time.perf_counter()
    backend = open_backend(model, device, dtype)
    resolved = check_for_model(settings, backend.info)
    heightmap = backend.info.output == "heightmap"
    if heightmap:
        check_outputs([relief_path(output)], overwrite)
    elif output.suffix.lower() != ".png":
        raise GigadiffError(f"output {output} must end in .png for model {backend.info.name!r}")
    if quiet:
        result = run_generation(resolved, backend)
    else:
        with RichProgress() as progress:
            result = run_generation(resolved, backend, listener=progress)
    meta = result.metadata
    if heightmap:
        meta = write_heightmap(result.decode()[0, 0].numpy(), output, meta, overwrite)
    else:
        write_png(result.image(), output, meta, overwrite)
    if save_latent is not None:
        write_latent(result.latents, save_latent, meta, overwrite)
    elapsed = time.perf_counter() - started
    s = result.settings
    typer.echo(
        f"wrote {output} ({s.width}x{s.height}, seed {s.seed}, {s.steps} steps, "
        f"{result.run.tiles_per_step} tiles/step, {result.run.model_calls} model calls) in {elapsed:.1f}s",
        err=True,
    )


def _quiet_libraries() -> None:
    """Our own progress bar is the one users read; silence the libraries' loading bars and notices."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def main() -> None:
    try:
        app()
    except GigadiffError as e:  # raised outside a command (should not happen, but never show a traceback)
        typer.echo(f"error: {e}", err=True)
        sys.exit(USER_ERROR)
