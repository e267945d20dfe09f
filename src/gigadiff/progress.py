"""A rich progress bar for every phase of a run: loading, denoising (each coherence stage), VAE, writing.

It hears the run's events (gigadiff.sampler.Listener): `on_phase` starts a phase with its unit count (None:
a bar without counts, e.g. while a model loads), `on_advance` counts its units (VAE tiles, pyramid levels),
and the denoising steps count tiles over the whole schedule so the ETA accounts for every model call still to
come; the label says so ("step 2/4", then "84/628 tiles of 4 steps"). Every phase gets a fresh bar, so nothing
of the last phase's counts shows in the next. A run that starts late (img2img: the last steps x strength of the
schedule) shows the steps it runs.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class Counts(MofNCompleteColumn):
    """ "done/total", or nothing for a phase that has no count (loading, writing a heightmap)."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.total is not None else Text("")


class RichProgress:
    def __init__(self, console: Console | None = None):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            Counts(),
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
        """A new phase: a fresh bar of `total` units (no counts without), or a label for the steps to come."""
        self.phase, self.denoising = name, False
        self._fresh(name or "starting", total, "tiles" if total else "")

    def _fresh(self, description: str, total: int | None, unit: str) -> None:
        self.progress.remove_task(self.task)  # a reset would keep the last phase's total when `total` is None
        self.task = self.progress.add_task(description, total=total, unit=unit)

    def on_advance(self, count: int) -> None:
        self.progress.advance(self.task, count)

    def on_step_start(self, step: int, total_steps: int, tiles: int, first_step: int = 0) -> None:
        """The first step of a schedule (or a step numbered no higher than the last one: the next coherence
        stage) starts a fresh bar of the tiles still to come in it."""
        steps = total_steps - first_step
        prefix = f"{self.phase} " if self.phase else ""
        label = prefix + f"step {step - first_step + 1}/{steps}"
        if not self.denoising or step <= self.last_step:
            self.denoising = True
            self._fresh(label, (total_steps - step) * tiles, f"tiles of {plural(total_steps - step, 'step')}")
        self.last_step = step
        self.progress.update(self.task, description=label)

    def on_tiles_done(self, count: int) -> None:
        self.progress.advance(self.task, count)

    def on_step_end(self, step: int, latents: object) -> None:
        pass


def plural(count: int, noun: str) -> str:
    """ "1 step", "4 steps"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
