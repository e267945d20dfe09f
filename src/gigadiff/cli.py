"""The `gigadiff` command line: a front end of the run layer (gigadiff.runs).

`generate` and `upscale` take their options from `RunRequest`'s fields (names, help, per-command defaults), build
a request and hand it over: resolved (every check before a model loads, and before torch is even imported), then
executed. Every user error is one line on stderr, naming the flag, with exit code 2; a failed peer rank exits 3.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from typer.core import TyperCommand

from gigadiff import __version__, interrupts
from gigadiff.errors import GigadiffError
from gigadiff.heap import use_huge_pages
from gigadiff.options import (
    FIELDS,
    GENERATE,
    GROUPS,
    OPTIONS,
    RESUME_OPTIONS,
    UPSCALE,
    RunRequest,
    command_default,
    flag,
)

if TYPE_CHECKING:
    from gigadiff.checkpoint import Checkpoint
    from gigadiff.executors.launch import Ranks
    from gigadiff.executors.local import TileExecutor
    from gigadiff.runs.resolve import Run

app = typer.Typer(
    name="gigadiff",
    help="Images of any size from diffusion models, by synchronized tiled denoising of one latent canvas.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

USER_ERROR = 2
RANK_FAILED = 3
ARGUMENT_NAMES = {("init", UPSCALE): "IMAGE", ("prompt", GENERATE): "PROMPT"}
TYPE_METAVARS = {"int": "N", "float": "X", "str": "TEXT"}


def cli_name(field: str, command: str = GENERATE) -> str:
    """How the command line shows a request field (`tile_batch` -> `--tile-batch`; upscale's image argument)."""
    return ARGUMENT_NAMES.get((field, command), flag(field))


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(USER_ERROR)


@contextlib.contextmanager
def reported_errors(command: str = GENERATE) -> Iterator[None]:
    """One line on stderr and a distinct exit code for user errors (2) and failed peer ranks (3).

    Torch is only touched here if a run already imported it, so that early errors stay fast."""
    try:
        yield
    except Exception as e:
        if interrupts.requested():  # the error is the interrupt's doing (a library cut short while loading)
            raise interrupts.Interrupted from None
        if isinstance(e, GigadiffError):
            raise fail(e.render(lambda f: cli_name(f, command))) from None
        if type(e).__name__ == "RankFailure":
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(RANK_FAILED) from None
        raise
    finally:
        dist = sys.modules.get("torch.distributed")
        if getattr(dist, "is_initialized", None) is not None:  # a group may exist (an import may have been cut)
            from gigadiff.executors.launch import shutdown

            with contextlib.suppress(Exception):
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


_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool}


def _python_type(annotation: str, override: Any) -> Any:
    if override is not None:
        return Optional[override]  # noqa: UP045 - typer needs a real object, not a string annotation
    base, _, rest = annotation.partition(" | ")
    kind = _TYPES[base]
    return Optional[kind] if rest == "None" else kind  # noqa: UP045


def command_parameters(command: str) -> list[inspect.Parameter]:
    """Typer parameters for `command`, one per request field the command takes, in the request's order, each
    under its option group in `--help`."""
    params = []
    for name in sorted(FIELDS, key=lambda n: (command not in OPTIONS[n].argument, GROUPS.index(OPTIONS[n].group))):
        f, o = FIELDS[name], OPTIONS[name]
        if command not in o.commands and command not in o.argument:
            continue
        kind = _python_type(str(f.type), o.cli_type)
        if command in o.argument:
            info: Any = typer.Argument(help=o.help, metavar=ARGUMENT_NAMES.get((name, command)), show_default=False)
        else:
            boolean = str(f.type).startswith("bool")
            choices = "|".join(o.choices) if len("|".join(o.choices)) <= 16 else "NAME" if o.choices else ""
            metavar = "" if boolean else o.metavar or choices or TYPE_METAVARS[str(f.type).split(" ")[0]]
            info = _option(name, o.help, o.group, *o.flags, boolean=boolean, on_by_default=f.default is not False,
                           metavar=metavar)  # fmt: skip
        default = command_default(name, command)
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                        annotation=Annotated[kind, info]))  # fmt: skip
    return params


def _option(name: str, help: str, group: str, *flags: str, on_by_default: bool = False, boolean: bool = False,
            metavar: str = "") -> Any:  # fmt: skip
    """A typer option for request field `name` (a boolean that may be on by default gets its --no- form). Values
    are checked by the run layer (gigadiff.options.check_values), not by the parser: one message for every
    front end."""
    decls = [flag(name), *flags]
    if boolean and on_by_default:
        decls = [f"{flag(name)}/--no-{name.replace('_', '-')}"]
    return typer.Option(*decls, help=help, metavar=metavar, rich_help_panel=group[0].upper() + group[1:])


class Command(TyperCommand):
    """A command whose flags (`--help` and every boolean) show no value placeholder in `--help`."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


def _register(handler: Any, name: str, params: list[inspect.Parameter], **options: Any) -> None:
    """Register `handler` as command `name` with typer parameters `params` (built from the request's fields)."""
    handler.__signature__ = inspect.Signature(params)
    handler.__annotations__ = {p.name: p.annotation for p in params}
    app.command(name=name, cls=Command, **options)(handler)


def request_command(command: str, help_text: str) -> None:
    """Register `command`, which builds a RunRequest from its options and runs it."""

    def handler(**values: Any) -> None:
        with reported_errors(command):
            run_request(RunRequest(**values), command)

    handler.__doc__ = help_text
    _register(handler, command, command_parameters(command))


request_command(GENERATE, "Generate an image of any size.")


MAX_GPU_MEMORY_GB = 4096


def plan_command() -> None:
    """Register `plan`: generate's options, answered with the run's memory plan instead of an image; with
    `--gpu-memory GB`, the plan on a CUDA GPU with that much free memory, present or not."""

    def handler(gpu_memory: float | None = None, **values: Any) -> None:
        with reported_errors(GENERATE):
            from gigadiff.runs.plan import GB, plan_run, render
            from gigadiff.runs.resolve import resolve

            if gpu_memory is not None and not 0 < gpu_memory <= MAX_GPU_MEMORY_GB:
                raise GigadiffError(f"--gpu-memory must be more than 0 and at most {MAX_GPU_MEMORY_GB} GB, got "
                                    f"{gpu_memory:g}")  # fmt: skip
            if gpu_memory is None:
                run = resolve(RunRequest(**values), GENERATE, writes=False)
                typer.echo(render(plan_run(run)))
                return
            device = values["device"] if str(values.get("device")).startswith("cuda") else "cuda"
            run = resolve(RunRequest(**{**values, "device": device}), GENERATE, writes=False)
            typer.echo(render(plan_run(run, free=int(gpu_memory * GB), device=device)))

    handler.__doc__ = ("Print the memory plan of a generate command, per phase on the device and the host, from "
                       "the model's config files: no weights are loaded.")  # fmt: skip
    gpu = typer.Option("--gpu-memory", help="Plan for a CUDA GPU with this many GB free (one this machine need "
                       "not have: what a card would need).", metavar="GB", show_default=False)  # fmt: skip
    kind = Optional[float]  # noqa: UP045 - typer needs a real object, not a string annotation
    extra = inspect.Parameter("gpu_memory", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                              annotation=Annotated[kind, gpu])  # fmt: skip
    params = command_parameters(GENERATE)
    _register(handler, "plan", [*params[:1], extra, *params[1:]])


plan_command()
request_command(UPSCALE, "Enlarge a picture: resize, tiled VAE encode, re-noise to --strength, tiled denoise, "
                         "tiled decode.")  # fmt: skip


def run_request(request: RunRequest, command: str = GENERATE, resume: Checkpoint | None = None) -> None:
    """Resolve and execute `request`: in this process, under torchrun's group, or by launching its processes."""
    from gigadiff.executors.launch import launched

    if launched():
        run, ranks = _resolve_in_group(request, command, resume is not None)
    else:
        from gigadiff.runs.resolve import resolve

        run = resolve(request, command, resuming=resume is not None)  # no torch yet: answers in a fraction of a second
        if run.request.processes > 1:
            from gigadiff.runs.spawn import spawn

            raise typer.Exit(spawn(run, resume))
        from gigadiff.executors.launch import Ranks

        ranks = Ranks()
    _execute(run, ranks, resume)


def _resolve_in_group(request: RunRequest, command: str, resuming: bool) -> tuple[Run, Ranks]:
    """Under torchrun: rank 0 resolves (its checks of output files included) and every rank runs its record."""
    from gigadiff.executors.launch import from_main, init_from_env
    from gigadiff.runs.resolve import resolve

    ranks = init_from_env(request.device, request.rank_timeout)
    verdict: Any = None
    if ranks.is_main:
        try:
            verdict = resolve(request, command, resuming=resuming).record()
        except GigadiffError as e:
            verdict = (e.template, e.fields)
    verdict = from_main(verdict, ranks)
    if isinstance(verdict, tuple):
        raise GigadiffError(verdict[0], *verdict[1])
    if request.processes > 1 and request.processes != ranks.world:
        raise GigadiffError(f"{{processes}} is {request.processes} but torchrun started {ranks.world} processes",
                            "processes")  # fmt: skip
    return resolve(RunRequest.from_dict(verdict), command, check_files=False), ranks


def _execute(run: Run, ranks: Ranks, resume: Checkpoint | None) -> None:
    from gigadiff.progress import RichProgress
    from gigadiff.runs.execute import execute

    quiet = run.request.quiet or not ranks.is_main
    if ranks.is_main:
        for note in run.notes:
            typer.echo(f"note: {note.render(flag)}", err=True)
    if quiet:
        done = execute(run, ranks=ranks, resume=resume)
    else:
        with RichProgress() as progress:
            progress.loading(run.request.model)
            done = execute(run, listener=progress, ranks=ranks, resume=resume, on_loaded=progress.loaded)
    if run.request.profile:
        report_profile(done.executor, ranks)
    if done.summary:
        typer.echo(done.summary, err=True)
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()  # leave the group together: a rank that left while rank 0 still wrote could abort


def resume_parameters() -> list[inspect.Parameter]:
    """`gigadiff resume`'s options: the request fields marked `resume`. Switches (quiet, overwrite, ...) are this
    invocation's own; every other option left out keeps the run's value."""
    params = [inspect.Parameter("checkpoint", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
        Path, typer.Argument(help="A checkpoint written with --checkpoint-every.", show_default=False)])]  # fmt: skip
    for name in RESUME_OPTIONS:
        f, o = FIELDS[name], OPTIONS[name]
        boolean = str(f.type).startswith("bool")
        kind = bool if boolean else _python_type(str(f.type).replace(" | None", "") + " | None", None)
        info = _option(name, o.help if boolean else f"{o.help} Default: the run's.", o.group, *o.flags)
        default = False if boolean else None
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                        annotation=Annotated[kind, info]))  # fmt: skip
    return params


def resume(checkpoint: Path, **changes: Any) -> None:
    """Continue an interrupted generation from its checkpoint: the run it records, to the same final image."""
    from gigadiff.checkpoint import load_checkpoint

    with reported_errors():
        ckpt = load_checkpoint(checkpoint)
        request = RunRequest.from_dict(ckpt.record, f"checkpoint {checkpoint}")
        given = {name: value for name, value in changes.items() if value is not None}
        run_request(request.replace(checkpoint=str(checkpoint), **given), GENERATE, ckpt)


_register(resume, "resume", resume_parameters())


@app.command(name="_run", hidden=True, cls=Command)
def run_recorded(
    record: Annotated[Path, typer.Argument(help="A resolved request (JSON), from a launcher.")],
    resume_from: Annotated[Path | None, typer.Option("--resume", help="Continue from this checkpoint.")] = None,
) -> None:
    """Run a recorded request: what `--processes N` starts under torchrun on every process."""
    import json

    with reported_errors():
        ckpt = None
        if resume_from is not None:
            from gigadiff.checkpoint import load_checkpoint

            ckpt = load_checkpoint(resume_from)
        run_request(RunRequest.from_dict(json.loads(record.read_text())), GENERATE, ckpt)


@app.command(cls=Command)
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
        if report.made_with:
            typer.echo(f"made with: {report.made_with}")
        if report.seams is None:
            typer.echo("seam score: no tile grid known (not a gigadiff output with metadata; give --tile)")
        else:
            sc = report.seams
            typer.echo(f"seam score: {sc.ratio:.3f} (random lines: 1 +- {sc.null_sd:.3f}), local {sc.local:.3f} "
                       f"(tile borders from {report.borders_from}; about 1: seamless, above 1.1: visible seams, "
                       "local below 0.9: smoothed bands)")  # fmt: skip
        e = report.edges
        if report.tileable:
            typer.echo(f"edge continuity: x {e.x:.2f}, y {e.y:.2f} (a tileable image: about 1 where it tiles with "
                       "itself; 10+: a visible seam)")  # fmt: skip
        else:
            typer.echo(f"edge continuity: x {e.x:.2f}, y {e.y:.2f} (not made tileable: its opposite edges are not "
                       "meant to meet)")  # fmt: skip
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


DATA_FOLDER = Path("gigadiff-data")


@app.command(cls=Command)
def serve(
    data: Annotated[Path, typer.Option(help="Folder of the job queue and of every job's files.")] = DATA_FOLDER,
    host: Annotated[
        str, typer.Option(help="Address to listen on; other than this machine's, --token is required.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port, printed at start).")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            help="Token clients must send (Bearer header or the page's login); default: $GIGADIFF_TOKEN.",
            show_default=False,
        ),
    ] = None,
    models: Annotated[
        Path | None, typer.Option(help="A folder of diffusers models jobs may name by folder name.")
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option(
            help="One worker per device, comma-separated (auto, cuda:0,cuda:1, cpu).  [default: auto]",
            show_default=False,
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Run jobs on the Ray cluster at this address instead (--data shared by its nodes).", show_default=False
        ),
    ] = None,
    max_side: Annotated[int, typer.Option(help="Largest canvas side (px) a job may ask for.")] = 16384,
    max_steps: Annotated[int, typer.Option(help="Most steps a job may ask for.")] = 200,
    max_processes: Annotated[int, typer.Option(help="Most processes (torchrun) a job may ask for.")] = 8,
    max_request_mb: Annotated[float, typer.Option(help="Largest request body (MiB), init images included.")] = 8.0,
    keep_models: Annotated[int, typer.Option(help="Models each worker keeps loaded between jobs.")] = 2,
    max_queued: Annotated[int, typer.Option(help="Jobs one client (address) may have waiting or running.")] = 50,
    max_attempts: Annotated[
        int, typer.Option(help="Runs a job may have (its worker died, its server stopped) before it fails.")
    ] = 3,
    keep_days: Annotated[
        float | None, typer.Option(help="Delete finished jobs and their files this many days after they end.")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Serve HTTPS with this certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The certificate's private key (PEM).")] = None,
) -> None:
    """Serve a job queue, its API (/docs) and a web page with a Deep Zoom viewer of the outputs."""
    from gigadiff.serve.config import ServeConfig
    from gigadiff.serve.server import serve as run_server

    with reported_errors("serve"):
        if ray is not None and devices is not None:
            raise GigadiffError("{devices} names this machine's workers; with {ray} the cluster's nodes run the jobs "
                                "(each on the GPUs Ray gives it)", "devices", "ray")  # fmt: skip
        devices = devices or "auto"
        config = ServeConfig(data=data, host=host, port=port, token=ServeConfig.token_from_env(token), models=models,
                             devices=tuple(d.strip() for d in devices.split(",") if d.strip()), max_side=max_side,
                             max_steps=max_steps, max_processes=max_processes, max_request_mb=max_request_mb,
                             keep_models=keep_models, max_queued=max_queued, max_attempts=max_attempts,
                             keep_days=keep_days, tls_cert=tls_cert, tls_key=tls_key, ray=ray)  # fmt: skip
        run_server(config, announce=lambda line: typer.echo(line))


def report_profile(executor: TileExecutor, ranks: Ranks) -> None:
    """Per-rank compute time, communication time and bytes exchanged, printed by rank 0."""
    mine = getattr(executor, "profile", None)
    row = {"rank": ranks.rank, **({} if mine is None else {k: v for k, v in vars(mine).items() if k != "per_step"})}
    rows = [row]
    if ranks.distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * ranks.world
        dist.all_gather_object(gathered, row)
        rows = gathered
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


def _terminate_cleanly(signum: int, frame: object) -> None:
    """SIGTERM (sent by torchrun when a peer fails) unwinds like an exception, so temporary files are removed."""
    raise SystemExit(128 + signum)


BARE_VALUES = {flag(name): o.bare for name, o in OPTIONS.items() if o.bare is not None}
"""Options that may be given bare, and the value they take then."""


def with_implied_values(args: list[str]) -> list[str]:
    """Insert the implied value after a bare optional-value option (`--tileable` means `--tileable both`).

    click cannot parse an option whose value is optional. The option is bare when nothing follows it, or the
    next option, or a prompt (words with spaces: `--tileable "a stone wall"`); a single word after it is taken
    as its value, so that a mistyped one (`--tileable z`) is refused naming the values that work rather than
    painted as the prompt.
    """
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in BARE_VALUES:
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or following.startswith("-") or " " in following.strip():
                out.append(BARE_VALUES[arg])
    return out


def main() -> None:
    interrupts.install()
    signal.signal(signal.SIGTERM, _terminate_cleanly)
    use_huge_pages()
    code: int | str | None = 0
    try:
        app(args=with_implied_values(sys.argv[1:]))
    except GigadiffError as e:  # raised outside a command (should not happen, but never show a traceback)
        typer.echo(f"error: {e.render(cli_name)}", err=True)
        code = USER_ERROR
    except interrupts.Interrupted:
        interrupts.report()
        code = interrupts.EXIT_CODE
    except SystemExit as e:
        code = e.code
    except Exception:
        if not interrupts.requested():
            raise
        interrupts.report()  # an error in code the interrupt cut short (a half-done import): its consequence
        code = interrupts.EXIT_CODE
    _exit(code)


def _exit(code: int | str | None) -> None:
    """Leave with `code`, skipping interpreter teardown: the outputs are written (or removed) by now. A Ctrl-C
    during a slow teardown would end the process by the signal, without a word; and in a torchrun rank, C++
    threads left in gloo or other native libraries can abort a finished rank while static objects are
    destroyed ("terminate called without an active exception", seen in CI)."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


__all__ = ["app", "main"]
