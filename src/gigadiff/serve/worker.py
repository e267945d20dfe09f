"""A service worker: one process per device, running queued jobs in order through the run layer.

It keeps the models it used last loaded (a job of the same model starts without loading it), records each
job's progress in the job store (step, tiles, phase, ETA) and a preview per step in the job's folder, and
checkpoints every job, so that a job interrupted by a killed server resumes from its last checkpoint when the
server starts again. A cancelled job stops at its next tile or VAE tile, through the same path as Ctrl-C
(gigadiff.interrupts): its outputs are never moved into place, and its folder is emptied. A worker ends when
its server does (it watches its parent process).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from gigadiff import interrupts
from gigadiff.errors import GigadiffError
from gigadiff.events import NullListener
from gigadiff.serve.config import ServeConfig
from gigadiff.serve.deepzoom import write_pyramid
from gigadiff.serve.jobs import IMAGE, RELIEF_VIEW, message, resolve_job
from gigadiff.serve.log import LOG, describe
from gigadiff.serve.store import Job, JobStore

IDLE_S = 0.2
WORKER_NICENESS = 10
"""Workers (and the torchrun processes they start; Ray tasks on the server's machine) run at a lower CPU priority
than the API: a job's tile compute is throughput work, a status poll is latency work, and on a CPU device or a
busy host they share cores. With nothing else to run, the worker gets the cores all the same."""


def lower_priority() -> None:
    """This process at the workers' priority (set, not added: a Ray worker process runs many tasks)."""
    os.setpriority(os.PRIO_PROCESS, 0, max(WORKER_NICENESS, os.getpriority(os.PRIO_PROCESS, 0)))


class ServerGone(BaseException):  # not the job's error: the process that owns the job is gone
    """The server process died: stop at once, leaving the job to be resumed by the next server."""


class Reporter(Protocol):
    """Where a running job's progress, stop checks and outcome go."""

    def progress(self, **values: Any) -> None: ...

    def check(self) -> None:
        """Raise ServerGone if the job's server is gone, interrupts.Interrupted if the job's cancel was asked."""

    def finish(self, status: str, error: str | None = None, outputs: list[str] | None = None) -> None: ...


class StoreReporter:
    """A worker process's reporter: the job store, and the server as its parent process (a Ray task's reports go
    to the server instead: gigadiff.serve.ray_pool)."""

    def __init__(self, store: JobStore, job_id: str, parent: int):
        self.store, self.job_id, self.parent = store, job_id, parent

    def progress(self, **values: Any) -> None:
        self.store.progress(self.job_id, **values)

    def check(self) -> None:
        if os.getppid() != self.parent:
            raise ServerGone
        if self.store.cancelled(self.job_id):
            raise interrupts.Interrupted

    def finish(self, status: str, error: str | None = None, outputs: list[str] | None = None) -> None:
        self.store.finish(self.job_id, status, error=error, outputs=outputs)


class JobListener(NullListener):
    """Reports a job's progress and stops it when it is cancelled (or its server is gone)."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter
        self.started = time.monotonic()
        self.tiles_done = self.tiles_total = 0
        self.step = self.steps = 0
        self.last_write = 0.0
        self.phase = ""

    def _write(self, force: bool = False, **values: Any) -> None:
        now = time.monotonic()
        if force or now - self.last_write > 0.2 or values:
            done, total = self.tiles_done, self.tiles_total
            eta = (now - self.started) * (total - done) / done if done and total > done else None
            self.reporter.progress(step=self.step, steps=self.steps, tiles=done, tiles_total=total, eta=eta, **values)
            self.last_write = now

    def on_phase(self, name: str, total: int | None) -> None:
        self.reporter.check()
        self.phase = name
        self._write(phase=name)

    def on_advance(self, count: int) -> None:
        self.reporter.check()

    def on_step_start(self, step: int, total_steps: int, tiles: int, first_step: int = 0) -> None:
        self.reporter.check()
        if self.tiles_total == 0 or step == first_step:
            self.tiles_total += (total_steps - step) * tiles
        self.step, self.steps = step - first_step, total_steps - first_step
        if self.phase != "denoising" and not self.phase.startswith("stage"):  # loading or encoding is over
            self.phase = "denoising"
            self._write(phase=self.phase)

    def on_tiles_done(self, count: int) -> None:
        self.tiles_done += count
        self.reporter.check()
        self._write()

    def on_step_end(self, step: int, latents: Any) -> None:
        self.step += 1
        self._write(force=True)


class ModelCache:
    """The backends a worker keeps loaded, least recently used first out."""

    def __init__(self, size: int):
        self.size = size
        self.backends: OrderedDict[tuple[str, Any], Any] = OrderedDict()

    def get(self, run: Any) -> tuple[Any, Any]:
        """(the run as its memory plan places it, its backend): loaded once per model and loading options; a
        later run of a cached model takes the tile batch its first run's plan chose, where it left the default."""
        from gigadiff.executors.launch import Ranks, rank_device
        from gigadiff.runs.execute import fitted, load

        key = (run.request.model, run.loading())
        if key in self.backends:
            self.backends.move_to_end(key)
            backend, lowered = self.backends[key]
            if lowered is not None and not run.tile_batch_given and lowered[0] < run.settings.tile_batch:
                run = run.with_tile_batch(*lowered)
            return run, backend
        placed, offload = fitted(run, rank_device(run.request.device, Ranks()))
        backend = load(placed, Ranks(), offload)
        lowered = None
        if placed.settings.tile_batch != run.settings.tile_batch:
            lowered = (placed.settings.tile_batch, placed.notes[-1])
        self.backends[key] = (backend, lowered)
        while len(self.backends) > self.size:
            self.backends.popitem(last=False)
        return placed, backend


def run_job(job: Job, reporter: Reporter, config: ServeConfig, device: str, cache: ModelCache) -> None:
    """Run one claimed job to its end: done, failed (with the command line's message) or cancelled, told to
    `reporter`; ServerGone leaves it running, for the next server to resume."""
    from gigadiff.checkpoint import load_checkpoint
    from gigadiff.runs.execute import execute

    folder = config.jobs / job.id
    started = time.monotonic()
    LOG.info("job %s started on %s (%s%s)", job.id, device, describe(job.request),
             f", attempt {job.attempts}" if job.attempts > 1 else "")  # fmt: skip

    def took() -> str:
        return f"{time.monotonic() - started:.1f} s"

    try:
        run = resolve_job(job.request, config, folder, device, resuming=True)
        checkpoint = run.outputs.checkpoint
        resume = load_checkpoint(checkpoint) if checkpoint is not None and checkpoint.is_file() else None
        listener = JobListener(reporter)
        reporter.progress(phase="loading " + job.request.get("model", "sd15"))
        if run.request.processes > 1:
            _run_processes(run, resume, reporter)
        else:
            execute(*cache.get(run), listener, resume=resume)
        relief = folder / "image.relief.png"
        if relief.is_file():
            reporter.progress(phase="writing the relief's Deep Zoom pyramid")
            write_pyramid(relief, folder / RELIEF_VIEW)
        others = sorted(p.name for p in folder.iterdir() if p.name.startswith("image.") and p.name != IMAGE)
        reporter.finish("done", outputs=[IMAGE, *others])
        LOG.info("job %s done in %s", job.id, took())
    except interrupts.Interrupted:
        shutil.rmtree(folder, ignore_errors=True)
        reporter.finish("cancelled")
        LOG.info("job %s cancelled after %s", job.id, took())
    except GigadiffError as e:
        shutil.rmtree(folder, ignore_errors=True)
        reporter.finish("failed", error=message(e))
        LOG.info("job %s failed after %s: %s", job.id, took(), message(e))
    except ServerGone:
        LOG.info("job %s left after %s for the next server to resume", job.id, took())
        raise
    except Exception as e:  # a bug, or a model that fails: the job fails, the worker goes on
        traceback.print_exc()
        shutil.rmtree(folder, ignore_errors=True)
        error = f"internal error: {type(e).__name__}: {str(e)[:500]}"
        reporter.finish("failed", error=error)
        LOG.info("job %s failed after %s: %s", job.id, took(), error)


def _run_processes(run: Any, resume: Any, reporter: Reporter) -> None:
    """A job asking for several processes: run under torchrun on this machine (gigadiff.runs.spawn), watched
    for cancellation."""
    import json
    import signal
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=run.outputs.image.parent, delete=False) as f:
        json.dump(run.record(), f)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={run.request.processes}", "-m", "gigadiff", "_run", f.name]  # fmt: skip
    if resume is not None:
        command += ["--resume", str(run.outputs.checkpoint)]
    reporter.progress(phase=f"running on {run.request.processes} processes")
    output = run.outputs.image.parent / "processes.log"  # a file, never a pipe: a full pipe would hang the ranks
    with open(output, "w") as log:
        proc = subprocess.Popen(command, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        while proc.poll() is None:
            try:
                reporter.check()
            except BaseException:  # cancelled, or the server is gone: the ranks stop too
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                raise
            time.sleep(IDLE_S)
    finally:
        Path(f.name).unlink(missing_ok=True)
    if proc.returncode != 0:
        raise GigadiffError(processes_error(output.read_text(errors="replace"), proc.returncode))
    output.unlink(missing_ok=True)


def processes_error(text: str, code: int) -> str:
    """What a failed multi-process run said: its error lines (each rank's, once), else the end of its output."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = list(dict.fromkeys(line.removeprefix("error: ") for line in lines if line.startswith("error: ")))
    if errors:
        return "; ".join(errors)
    tail = " | ".join(lines[-5:])
    return f"the processes ended with exit code {code}" + (f": {tail[-1500:]}" if tail else "")


def main(config: ServeConfig, device: str, parent: int) -> None:
    """The worker loop (the entry point of a worker process)."""
    from gigadiff.backends.pipelines import quiet_libraries

    with contextlib.suppress(Exception):
        quiet_libraries()
    store = JobStore(config.database)
    cache = ModelCache(config.keep_models)
    try:
        while os.getppid() == parent:
            job = store.claim(worker=os.getpid(), runs_on=device)
            if job is None:
                time.sleep(IDLE_S)
                continue
            interrupts.reset()
            run_job(job, StoreReporter(store, job.id, parent), config, device, cache)
    except (ServerGone, KeyboardInterrupt):
        pass
