"""The service's workers kept alive: one per device, replaced when one dies, and the job it was running resumed or
failed.

A worker can die under its job: the OOM killer, a segfault in a native library, SIGKILL, a database it can no
longer write. The supervisor, a thread of the server process, looks every SUPERVISE_S seconds. A dead worker's
job goes back to the queue, to resume from its last checkpoint, unless it has been tried `max_attempts` times,
when it fails with the reason (a job that kills its worker is not retried forever); a job whose cancel was asked
is cancelled. Failed and cancelled jobs' folders are removed, as a worker does. Then a new worker starts for the
device, after a pause that doubles while workers of that device keep dying young (a worker that cannot even
start does not spin) and resets once one has lived a minute. It also deletes finished jobs older than the
retention (`--keep-days`), with their files.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from gigadiff.serve.config import ServeConfig
from gigadiff.serve.log import LOG
from gigadiff.serve.store import JobStore

SUPERVISE_S = 1.0
RESTART_PAUSE_S, RESTART_PAUSE_MAX_S, HEALTHY_AFTER_S = 1.0, 60.0, 60.0
EXPIRE_EVERY_S = 600.0
"""How often finished jobs are checked against the retention (`--keep-days`)."""


def death(process: Any) -> str:
    """How a worker process ended, in words."""
    code = process.exitcode
    if code is not None and code < 0:
        with_name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return f"its worker died ({with_name})"
    return f"its worker died (exit code {code})"


class Supervisor:
    """Start the workers, and replace any that dies until `stop`."""

    tick_s = SUPERVISE_S
    """How often it looks."""

    def __init__(self, config: ServeConfig, target: Callable[..., None]):
        self.config, self.target = config, target
        self.context = multiprocessing.get_context("spawn")
        self.store = JobStore(config.database)
        self.workers: dict[str, Any] = {}
        """The worker process of each device (None between a death and its replacement)."""
        self.started: dict[str, float] = {}
        self.pause: dict[str, float] = {}
        self.restart_at: dict[str, float] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="gigadiff-supervisor", daemon=True)

    def start(self) -> None:
        for device in self.config.devices:
            self._start(device)
        self.thread.start()

    def describe(self) -> str:
        """Where jobs run, for the server's first line."""
        return f"{len(self.config.devices)} worker(s) on {', '.join(self.config.devices)}"

    def _start(self, device: str) -> None:
        process = self.context.Process(target=self.target, args=(self.config, device, os.getpid()), daemon=True,
                                       name=f"gigadiff-worker-{device}")  # fmt: skip
        process.start()
        self.workers[device], self.started[device] = process, time.monotonic()

    def expire(self) -> None:
        """Delete the jobs that ended more than `keep_days` ago, with their files."""
        if self.config.keep_days is None:
            return
        for job_id in self.store.finished_before(time.time() - self.config.keep_days * 86400):
            if self.store.delete(job_id, self.config.jobs / job_id):
                LOG.info("job %s deleted: it ended more than %g days ago", job_id, self.config.keep_days)

    def _watch(self) -> None:
        expired = -math.inf
        while not self.stopping.wait(self.tick_s):
            now = time.monotonic()
            try:
                if now - expired >= EXPIRE_EVERY_S:
                    expired = now
                    self.expire()
                self._tend(now)
            except Exception:  # a database locked too long, a cluster briefly unreachable: look again next time
                LOG.exception("the supervisor's look at its workers failed; it looks again in %.1f s", self.tick_s)

    def _tend(self, now: float) -> None:
        """Replace the workers that died (after their pause)."""
        for device, process in list(self.workers.items()):
            if process is None:
                if now >= self.restart_at[device]:
                    self._start(device)
            elif not process.is_alive():
                self._lost(device, process)

    def recover(self) -> dict[str, list[str]]:
        """The jobs a stopped server left running, settled as a dead worker's are (before any worker starts)."""
        return self._settle(self.store.recover(self.config.max_attempts), "its server stopped while it ran")

    def _settle(self, outcome: dict[str, list[str]], reason: str) -> dict[str, list[str]]:
        """Log what became of the jobs a worker or server left running; failed and cancelled lose their folders."""
        for status, jobs in outcome.items():
            for job_id in jobs:
                LOG.info("job %s: %s; %s", job_id, reason, "queued again to resume" if status == "queued" else status)
                if status != "queued":
                    shutil.rmtree(self.config.jobs / job_id, ignore_errors=True)
        return outcome

    def _lost(self, device: str, process: Any) -> None:
        reason = death(process)
        self._settle(self.store.orphaned(process.pid, reason, self.config.max_attempts), reason)
        lived = time.monotonic() - self.started[device]
        pause = RESTART_PAUSE_S if lived > HEALTHY_AFTER_S else self.pause.get(device, RESTART_PAUSE_S / 2) * 2
        self.pause[device] = min(pause, RESTART_PAUSE_MAX_S)
        self.workers[device], self.restart_at[device] = None, time.monotonic() + self.pause[device]
        LOG.info("worker on %s (pid %s): %s after %.0f s; a new one starts in %.0f s", device, process.pid,
                 reason.removeprefix("its worker "), lived, self.pause[device])  # fmt: skip

    def stop(self, grace_s: float) -> None:
        """Stop watching, then the workers (SIGTERM, and SIGKILL after `grace_s`)."""
        self.stopping.set()
        self.thread.join(grace_s)
        alive = [p for p in self.workers.values() if p is not None]
        for process in alive:
            if process.is_alive():
                process.terminate()
        for process in alive:
            process.join(grace_s)
            if process.is_alive():
                process.kill()
