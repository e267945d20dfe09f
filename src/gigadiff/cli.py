"""The `gigadiff` command line.

Every user error (bad size, missing model, existing output...) is reported in one line on stderr with exit
code 2, before any model is loaded where possible and always before the first denoising step.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gigadiff import __version__
from gigadiff.errors import GigadiffError
from gigadiff.heap import use_huge_pages

if TYPE_CHECKING:
    from gigadiff.api import GenerationResult
    from gigadiff.checkpoint import Checkpoint
    from gigadiff.executors.launch import Ranks
    from gigadiff.executors.local import TileExecutor
    from gigadiff.recipes.txt2img import CheckpointPolicy
    from gigadiff.settings import GenerationSettings
    from gigadiff.vae.tiled import VaeTiling

app = typer.Typer(
    name="gigadiff",
    help="Images of any size from diffusion models, by synchronized tiled denoising of one latent canvas.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

USER_ERROR = 2
RANK_FAILED = 3


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(USER_ERROR)


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """One line on stderr and a distinct exit code for user errors (2) and failed peer ranks (3)."""
    from gigadiff.executors.distributed import RankFailure
    from gigadiff.executors.launch import shutdown

    try:
        yield
    except GigadiffError as e:
        raise fail(str(e)) from None
    except RankFailure as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(RANK_FAILED) from None
    finally:
        shutdown()


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
    overlap: Annotated[
        int | None, typer.Option(help="Minimum tile overlap in image pixels (default: tile/8, terrain tile/2).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Fusion weights: uniform, gaussian, cosine or linear (default: the model's; gaussian, "
            "linear for terrain)."
        ),
    ] = None,
    shift: Annotated[bool, typer.Option("--shift/--no-shift", help="Move the tile grid at every step.")] = True,
    level_sync: Annotated[
        bool | None,
        typer.Option(
            "--level-sync/--no-level-sync",
            help="Tiles share the canvas's low frequencies instead of each painting its own level (default: "
            "the model's; on for terrain).",
        ),
    ] = None,
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
    init: Annotated[
        Path | None, typer.Option("--init", help="img2img: start from this image (resized to --size, default its own).")
    ] = None,
    strength: Annotated[
        float | None, typer.Option(help="img2img: how much of the init image to repaint, in (0, 1] (default 0.8).")
    ] = None,
    coherence: Annotated[
        str,
        typer.Option(
            help="progressive (x2 stages from the native size: no repeated subjects), none, or auto "
            "(progressive beyond twice the native size)."
        ),
    ] = "auto",
    regions: Annotated[
        Path | None, typer.Option(help="Regional prompts: a JSON file of boxes/masks with their own prompts.")
    ] = None,
    tileable: Annotated[
        str,
        typer.Option(help="Seamless output: --tileable (both ways, a texture), --tileable x (360-degree panorama), y."),
    ] = "none",
    device: Annotated[str, typer.Option(help="auto, cuda, mps or cpu.")] = "auto",
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16.")] = "fp32",
    vae_mode: Annotated[
        str, typer.Option(help="Tiled VAE: exact (whole-image statistics), fast (streamed), auto (exact if it fits).")
    ] = "auto",
    vae_memory: Annotated[
        float | None, typer.Option(help="Device memory (GB) a VAE tile may use (default: half the free GPU, 2 on CPU).")
    ] = None,
    vae_spill: Annotated[
        Path | None, typer.Option(help="Directory for exact-mode VAE buffers that do not fit in RAM.")
    ] = None,
    save_latent: Annotated[
        Path | None, typer.Option(help="Also save the final latent canvas to this .safetensors file.")
    ] = None,
    profile: Annotated[
        bool, typer.Option(help="Report compute time, communication time and bytes exchanged per rank.")
    ] = False,
    rank_timeout: Annotated[
        float, typer.Option(help="Seconds a rank may go silent before a multi-process run is ended.")
    ] = 600.0,
    cfg_split: Annotated[
        bool, typer.Option(help="torchrun only: run unconditional and conditional passes on different ranks.")
    ] = False,
    checkpoint_every: Annotated[
        int, typer.Option(help="Save a resumable checkpoint every K steps (0: never).", min=0)
    ] = 0,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint file (default: <output>.checkpoint.safetensors).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Generate an image of any size."""
    options = dict(locals())
    with reported_errors():
        _generate(**options)


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
    weights: str | None,
    shift: bool,
    level_sync: bool | None,
    tile_batch: int,
    guidance_rescale: float,
    eta: float,
    sigmas: str | None,
    difficulty: float | None,
    init: Path | None,
    strength: float | None,
    coherence: str,
    regions: Path | None,
    tileable: str,
    device: str,
    dtype: str,
    vae_mode: str,
    vae_memory: float | None,
    vae_spill: Path | None,
    save_latent: Path | None,
    profile: bool,
    rank_timeout: float,
    cfg_split: bool,
    checkpoint_every: int,
    checkpoint: Path | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    from gigadiff.executors.launch import from_main, init_from_env
    from gigadiff.settings import new_seed, settings_from_options
    from gigadiff.vae.tiled import VaeTiling

    vae = VaeTiling(mode=vae_mode, memory_gb=vae_memory, spill_dir=vae_spill)  # type: ignore[arg-type]

    if rank_timeout <= 0:
        raise GigadiffError(f"rank timeout must be positive, got {rank_timeout}")
    from gigadiff.api import init_size

    if init is not None and size is None:
        size = "{}x{}".format(*init_size(str(init)))
    region_file = None
    if regions is not None:
        from gigadiff.regions import load_region_file

        region_file = load_region_file(regions)
        prompt = prompt or region_file.background.get("prompt", "")
        negative = negative or region_file.background.get("negative_prompt", "")
    ranks = init_from_env(device, rank_timeout)
    settings = settings_from_options(
        prompt,
        size=size,
        seed=from_main(seed if seed is not None else new_seed(), ranks),
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
        level_sync=level_sync,
        tile_batch=tile_batch,
        guidance_rescale=guidance_rescale,
        eta=eta,
        tileable=tileable,
        init_image=str(init) if init is not None else None,
        strength=strength,
        coherence=coherence,
        **({"regions": region_file.regions, "region_feather": region_file.feather} if region_file else {}),
    )
    _execute(settings, model, device, dtype, output, save_latent, profile, rank_timeout, overwrite, quiet, ranks,
             checkpoint_every, checkpoint, cfg_split=cfg_split, vae=vae)  # fmt: skip


@app.command()
def upscale(
    image: Annotated[Path, typer.Argument(help="The picture to enlarge.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What the picture shows (guides the new detail).")] = "",
    scale: Annotated[float, typer.Option(help="Enlargement factor (the output size is rounded to 8 px).")] = 2.0,
    strength: Annotated[float, typer.Option(help="How much to repaint, in (0, 1]: low keeps the picture.")] = 0.35,
    model: Annotated[
        str, typer.Option("--model", "-m", help="A preset (sd15, sdxl, ...), hub id, folder or file.")
    ] = "sd15",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output .png/.tif (default: IMAGE_x<scale>.png).")
    ] = None,
    negative: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "blurry, soft, low detail",
    steps: Annotated[int | None, typer.Option(help="Denoising steps before strength (default: the model's).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: a new random seed).")] = None,
    scheduler: Annotated[str, typer.Option(help="default, ddim, euler, dpmpp_2m, unipc, ...")] = "default",
    tile: Annotated[int | None, typer.Option(help="Tile side in pixels (default: native size).")] = None,
    overlap: Annotated[int | None, typer.Option(help="Minimum tile overlap in pixels (default: tile/8).")] = None,
    tile_batch: Annotated[int, typer.Option(help="Tiles per model call.")] = 4,
    tileable: Annotated[str, typer.Option(help="Keep a seamless texture seamless: both, x or y.")] = "none",
    device: Annotated[str, typer.Option(help="auto, cuda, mps or cpu.")] = "auto",
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16.")] = "fp32",
    vae_mode: Annotated[str, typer.Option(help="Tiled VAE: exact, fast or auto.")] = "auto",
    vae_memory: Annotated[float | None, typer.Option(help="Device memory (GB) a VAE tile may use.")] = None,
    vae_spill: Annotated[Path | None, typer.Option(help="Directory for exact-mode VAE buffers.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Enlarge a picture: resize, tiled VAE encode, re-noise to --strength, tiled denoise, tiled decode."""
    import inspect

    from gigadiff.api import init_size

    given = dict(locals())
    with reported_errors():
        width, height = init_size(str(image), scale)
        options = {name: p.default for name, p in inspect.signature(generate).parameters.items()}
        options.update({k: v for k, v in given.items() if k in options})
        suffix = f"{scale:g}".replace(".", "_")
        options.update(init=image, size=f"{width}x{height}",
                       output=output or image.with_name(f"{image.stem}_x{suffix}.png"))  # fmt: skip
        _generate(**options)


@app.command()
def resume(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written with --checkpoint-every.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead.")] = None,
    device: Annotated[str, typer.Option(help="auto, cuda, mps or cpu.")] = "auto",
    checkpoint_every: Annotated[int, typer.Option(help="Keep checkpointing every K steps.", min=0)] = 0,
    profile: Annotated[bool, typer.Option(help="Report per-rank compute and communication.")] = False,
    rank_timeout: Annotated[float, typer.Option(help="Seconds a rank may go silent.")] = 600.0,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Continue an interrupted generation from its checkpoint; the result equals an uninterrupted run."""
    from gigadiff.checkpoint import load_checkpoint
    from gigadiff.executors.launch import init_from_env

    with reported_errors():
        ckpt = load_checkpoint(checkpoint)
        ranks = init_from_env(device, rank_timeout)
        saved = ckpt.outputs
        target = output or Path(saved["output"])
        latent = Path(saved["save_latent"]) if saved.get("save_latent") else None
        every = checkpoint_every or int(saved.get("checkpoint_every", 0))
        _execute(ckpt.settings, ckpt.model, device, saved.get("dtype", "fp32"), target, latent, profile,
                 rank_timeout, overwrite, quiet, ranks, every, checkpoint, resume_from=ckpt)  # fmt: skip


@app.command()
def metrics(
    image: Annotated[Path, typer.Argument(help="An image (PNG, TIFF, JPEG); gigadiff outputs bring their tile grid.")],
    tile: Annotated[
        int | None, typer.Option(help="Score seams on this tile grid (px) instead of the one in the metadata.")
    ] = None,
    overlap: Annotated[int, typer.Option(help="Overlap (px) of the --tile grid.")] = 0,
    crops: Annotated[int, typer.Option(help="Duplication: compare crops of an N x N grid.", min=2)] = 4,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --json file.")] = False,
) -> None:
    """Seam score on tile borders, edge continuity (tileable output), a duplication signal and grid anisotropy."""
    from gigadiff.io.files import check_outputs, publish
    from gigadiff.report import image_report

    with reported_errors():
        if json_out is not None:
            check_outputs([json_out], overwrite)
        report = image_report(image, tile, overlap, crops)
        typer.echo(f"{report.path}: {report.width}x{report.height}")
        if report.seams is None:
            typer.echo("seam score: no tile grid known (not a gigadiff output with metadata; give --tile)")
        else:
            sc = report.seams
            typer.echo(f"seam score: {sc.ratio:.3f} (random lines: 1 +- {sc.null_sd:.3f}), local {sc.local:.3f} "
                       f"(tile borders from {report.borders_from}; about 1: seamless, above 1.1: visible seams, "
                       "local below 0.9: smoothed bands)")  # fmt: skip
        e = report.edges
        typer.echo(f"edge continuity: x {e.x:.2f}, y {e.y:.2f} (about 1: tiles with itself; 10+: a visible seam)")
        d = report.duplication
        typer.echo(f"duplication: {d.score:.2f} between crops {d.pair[0]} and {d.pair[1]} (mean {d.mean:.2f}; "
                   "above 0.6: repeated content)")  # fmt: skip
        g = report.grid
        typer.echo(f"grid anisotropy: {g.ratio:.2f} (chance: x/ {math.exp(g.null_sd):.2f}; about 1: no preferred "
                   "direction, well above: a grid of straight axis-aligned edges, e.g. tile plateaus)")  # fmt: skip
        if json_out is not None:
            import json

            text = json.dumps(report.to_dict(), indent=2)
            publish(json_out, lambda tmp: tmp.write_text(text + "\n"), overwrite)


def _execute(
    settings: GenerationSettings,
    model: str,
    device: str,
    dtype: str,
    output: Path,
    save_latent: Path | None,
    profile: bool,
    rank_timeout: float,
    overwrite: bool,
    quiet: bool,
    ranks: Ranks,
    checkpoint_every: int,
    checkpoint: Path | None,
    resume_from: Checkpoint | None = None,
    cfg_split: bool = False,
    vae: VaeTiling | None = None,
) -> None:
    """Check outputs, load the model, run (or continue) the generation, write the results on rank 0."""
    from gigadiff.executors.launch import rank_device
    from gigadiff.io.files import check_outputs
    from gigadiff.io.heightmap import HEIGHTMAP_SUFFIXES as OUTPUT_SUFFIXES  # images take the same
    from gigadiff.io.heightmap import relief_path
    from gigadiff.io.writers import sidecar_path
    from gigadiff.recipes.txt2img import CheckpointPolicy
    from gigadiff.vae.tiled import VaeTiling

    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise GigadiffError(f"output {output} must end in .png, .tif or .tiff")
    if save_latent is not None and save_latent.suffix != ".safetensors":
        raise GigadiffError(f"--save-latent {save_latent} must end in .safetensors")
    outputs = [output, sidecar_path(output), *([save_latent] if save_latent else [])]
    policy = None
    if checkpoint_every:
        path = checkpoint or output.with_name(f"{output.stem}.checkpoint.safetensors")
        if resume_from is None:
            outputs.append(path)
        recorded = {"output": str(output), "save_latent": str(save_latent) if save_latent else None,
                    "checkpoint_every": checkpoint_every, "dtype": dtype}  # fmt: skip
        policy = CheckpointPolicy(path, checkpoint_every, model, recorded, write=ranks.is_main)
    agreed(lambda: check_outputs(outputs, overwrite), ranks)

    from gigadiff.api import open_backend, run_generation
    from gigadiff.progress import RichProgress
    from gigadiff.settings import check_for_model

    _quiet_libraries()
    started = time.perf_counter()
    backend = open_backend(model, rank_device(device, ranks), dtype)
    resolved = check_for_model(settings, backend.info)
    heightmap = backend.info.output == "heightmap"
    if heightmap:
        agreed(lambda: check_outputs([relief_path(output)], overwrite), ranks)
    if hasattr(backend, "vae_tiling"):
        backend.vae_tiling = vae or VaeTiling()
        backend.check_decode(1, resolved.height, resolved.width)  # an impossible decode fails now, not after hours
    if cfg_split:
        if not ranks.distributed:
            raise GigadiffError("--cfg-split shares guidance passes between processes: launch with torchrun")
        if not hasattr(backend, "predict_branch") or not (resolved.guidance or 0) > 1:
            raise GigadiffError("--cfg-split needs a model run with classifier-free guidance (guidance > 1)")
    executor = make_executor(resolved.tile_batch, ranks, rank_timeout, cfg_split)
    if quiet or not ranks.is_main:
        result = run_generation(resolved, backend, executor, None, policy, resume_from)
    else:
        with RichProgress() as progress:
            result = run_generation(resolved, backend, executor, progress, policy, resume_from)
    if profile:
        report_profile(executor, ranks)
    if ranks.is_main:
        _write_results(result, output, save_latent, policy, overwrite, started)
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()  # leave the group together: a rank that left while rank 0 still wrote could abort


def _write_results(
    result: GenerationResult,
    output: Path,
    save_latent: Path | None,
    policy: CheckpointPolicy | None,
    overwrite: bool,
    started: float,
) -> None:
    from gigadiff.io.heightmap import write_heightmap
    from gigadiff.io.streaming import write_streamed
    from gigadiff.io.writers import write_latent, write_png

    meta = result.metadata
    heightmap = result.info.output == "heightmap"
    if heightmap:
        meta = write_heightmap(result.decode()[0, 0].numpy(), output, meta, overwrite)
    elif hasattr(result.backend, "stream_decode"):
        h, w = result.latents.shape[2:]
        f = result.info.vae_scale_factor
        decode = partial(result.backend.stream_decode, result.latents)
        write_streamed(decode, output, w * f, h * f, meta, overwrite)
    else:
        write_png(result.image(), output, meta, overwrite)
    if save_latent is not None:
        write_latent(result.latents, save_latent, meta, overwrite)
    if policy is not None and policy.path.exists():
        policy.path.unlink()  # the finished outputs supersede this run's checkpoint
    elapsed = time.perf_counter() - started
    s = result.settings
    typer.echo(
        f"wrote {output} ({s.width}x{s.height}, seed {s.seed}, {s.steps} steps, "
        f"{result.run.tiles_per_step} tiles/step, {result.run.model_calls} model calls) in {elapsed:.1f}s",
        err=True,
    )


def agreed(check: Callable[[], None], ranks: Ranks) -> None:
    """Run a check on rank 0 only (e.g. of output paths) and raise its error, if any, on every rank."""
    from gigadiff.executors.launch import from_main

    verdict = None
    if ranks.is_main:
        try:
            check()
        except GigadiffError as e:
            verdict = str(e)
    verdict = from_main(verdict, ranks)
    if verdict:
        raise GigadiffError(verdict)


def make_executor(tile_batch: int, ranks: Ranks, timeout_s: float, cfg_split: bool = False) -> TileExecutor:
    from gigadiff.executors.distributed import DistributedExecutor
    from gigadiff.executors.local import LocalExecutor

    if ranks.distributed:
        return DistributedExecutor(tile_batch, timeout_s=timeout_s, cfg_split=cfg_split)
    return LocalExecutor(tile_batch)


def report_profile(executor: TileExecutor, ranks: Ranks) -> None:
    """Per-rank compute time, communication time and bytes exchanged, printed by rank 0."""
    import torch.distributed as dist

    mine = getattr(executor, "profile", None)
    row = {"rank": ranks.rank, **({} if mine is None else {k: v for k, v in vars(mine).items() if k != "per_step"})}
    rows = [row]
    if ranks.distributed:
        rows = [None] * ranks.world
        dist.all_gather_object(rows, row)
    if not ranks.is_main:
        return
    typer.echo(f"{'rank':>4} {'tiles':>6} {'compute s':>10} {'comm s':>8} {'MB exchanged':>13}", err=True)
    for r in rows:
        assert r is not None
        typer.echo(
            f"{r['rank']:>4} {r.get('tiles', 0):>6} {r.get('compute_s', 0.0):>10.2f} {r.get('comm_s', 0.0):>8.2f} "
            f"{r.get('bytes_exchanged', 0) / 1e6:>13.2f}",
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


def _terminate_cleanly(signum: int, frame: object) -> None:
    """SIGTERM (sent by torchrun when a peer fails) unwinds like an exception, so temporary files are removed."""
    raise SystemExit(128 + signum)


OPTIONAL_VALUES = {"--tileable": ("both", ("none", "x", "y", "both"))}
"""Options that may be given bare: the value they take then, and the values that may follow them."""


def with_implied_values(args: list[str]) -> list[str]:
    """Insert the implied value after a bare optional-value option (`--tileable` means `--tileable both`).

    click cannot parse an option whose value is optional; a word after it that is not one of its values (the
    prompt, or the next option) is left alone, so `--tileable "a stone wall"` still reads the prompt.
    """
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in OPTIONAL_VALUES:
            implied, values = OPTIONAL_VALUES[arg]
            following = args[i + 1] if i + 1 < len(args) else None
            if following not in values:
                out.append(implied)
    return out


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate_cleanly)
    use_huge_pages()
    code: int | str | None = 0
    try:
        app(args=with_implied_values(sys.argv[1:]))
    except GigadiffError as e:  # raised outside a command (should not happen, but never show a traceback)
        typer.echo(f"error: {e}", err=True)
        code = USER_ERROR
    except SystemExit as e:
        code = e.code
    _exit(code)


def _exit(code: int | str | None) -> None:
    """Leave with `code`. A torchrun rank skips interpreter teardown: its outputs are written and its process
    group destroyed by now, and C++ threads left in gloo or other native libraries can abort a finished rank
    while static objects are destroyed ("terminate called without an active exception", seen in CI)."""
    from gigadiff.executors.launch import launched

    if not launched():
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
