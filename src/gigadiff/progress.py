"""A rich progress bar fed by the sampler's step events: step, tiles done, elapsed time and ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RichProgress:
    """Counts tiles over the whole run, so the ETA accounts for every model call still to come."""

    def __init__(self, console: Console | None = None):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tiles"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self.task = self.progress.add_task("starting", total=None)
        self.last_step = -1

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def loading(self, model: str) -> None:
        self.progress.update(self.task, description=f"loading {model}")

    def loaded(self) -> None:
        self.progress.update(self.task, description="starting")

    def on_step_start(self, step: int, total_steps: int, tiles: int) -> None:
        """A step numbered no higher than the last one starts a new sequence of steps (a coherence stage):
        its tiles are added to the total then (the ETA covers the stages started so far)."""
        task = self.progress.tasks[0]
        if task.total is None or step <= self.last_step:
            self.progress.update(self.task, total=(task.total or 0) + (total_steps - step) * tiles)
        self.last_step = step
        self.progress.update(self.task, description=f"step {step + 1}/{total_steps}")

    def on_tiles_done(self, count: int) -> None:
        self.progress.advance(self.task, count)

    def on_step_end(self, step: int, latents: object) -> None:
        pass
