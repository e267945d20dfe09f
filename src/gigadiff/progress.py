"""A rich progress bar for every phase of a run: loading, denoising (each coherence stage), VAE, writing.

It hears the run's events (gigadiff.sampler.Listener): `on_phase` starts a phase with its unit count (None:
a spinner, e.g. while a model loads), `on_advance` counts its units (VAE tiles, pyramid levels), and the
denoising steps count tiles over the whole schedule so the ETA accounts for every model call still to come.
A run that starts late (img2img: the last steps x strength of the schedule) shows the steps it runs.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RichProgress:
    def __init__(self, console: Console | None = None):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self.task = self.progress.add_task("starting", total=None, unit="")
        self.phase = ""
        self.denoising = False
        self.last_step = -1

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def loading(self, model: str) -> None:
        self.on_phase(f"loading {model}", None)

    def loaded(self) -> None:
        self.on_phase("", None)

    def on_phase(self, name: str, total: int | None) -> None:
        """A new phase: a fresh bar of `total` units (a spinner without), or a label for the steps to come."""
        self.phase, self.denoising = name, False
        self.progress.reset(self.task, total=total, completed=0, description=name or "starting",
                            unit="tiles" if total else "")  # fmt: skip

    def on_advance(self, count: int) -> None:
        self.progress.advance(self.task, count)

    def on_step_start(self, step: int, total_steps: int, tiles: int, first_step: int = 0) -> None:
        """The first step of a schedule (or a step numbered no higher than the last one: the next coherence
        stage) starts a fresh bar of the tiles still to come in it."""
        if not self.denoising or step <= self.last_step:
            self.denoising = True
            self.progress.reset(self.task, total=(total_steps - step) * tiles, completed=0, unit="tiles")
        self.last_step = step
        prefix = f"{self.phase} " if self.phase else ""
        label = f"step {step - first_step + 1}/{total_steps - first_step}"
        self.progress.update(self.task, description=prefix + label)

    def on_tiles_done(self, count: int) -> None:
        self.progress.advance(self.task, count)

    def on_step_end(self, step: int, latents: object) -> None:
        pass
