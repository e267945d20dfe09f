"""Jobs on a Ray cluster (`gigadiff serve --ray ADDRESS`): when one machine's GPUs are not enough.

The API server stays one process on a node of the cluster (usually its head), with the job queue in its data
folder. Instead of a worker process per device, a thread of the server claims queued jobs and runs each as a
Ray task asking for its processes' GPUs (CPUs on a cluster without GPUs) as Ray resources, so that Ray places
it on a node with that many free; a job asking for `processes: N` runs its N ranks under torchrun on that one
node, as a worker would. The task runs the job exactly as a worker process does (`worker.run_job`), on the
data folder, which the nodes must share (the same path on every node: a shared filesystem): the job's
checkpoints, preview and outputs are written there, and the API serves them from there.

What does not go through the filesystem goes through a small Ray actor pinned to the server's node, the board:
a task sends its progress and outcome to it, in order, and reads from it whether its cancel was asked; the
server's thread moves the reports into the job store (the only writer of the database is the server's node:
SQLite on a network filesystem is not safe) and marks cancels. Ray retries nothing itself: when a task is lost
(its node died, its worker process crashed), the server puts the job back in the queue as it does for a dead
worker, to resume from its last checkpoint on another node, up to `--max-attempts`.

Each task is a fresh run of the job: its model is loaded again unless the Ray worker process that runs it kept it
from an earlier job (Ray reuses worker processes for CPU tasks, and starts a new one for each GPU task).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Any

from gigadiff.errors import GigadiffError, first_line
from gigadiff.serve.config import ServeConfig
from gigadiff.serve.log import LOG
from gigadiff.serve.store import Job
from gigadiff.serve.supervisor import Supervisor

RAY_TICK_S = 0.2
"""How often the server moves its tasks' reports into the store, and looks for ended tasks and free nodes."""
CHECK_EVERY_S = 0.25
"""How often a task asks the board whether its job's cancel was asked (at most)."""
CAPACITY_EVERY_S = 2.0
"""How often the server reads the cluster's nodes (they come and go)."""
REACH_S = 10.0
"""How long the cluster's head may take to accept a connection before the server refuses to start."""
RAY_SETUP = "pip install 'gigadiff[ray]'"


class Board:
    """A Ray actor on the server's node: the reports of the server's tasks, in the order sent, and the jobs whose
    cancel was asked. (Calls from one task to an actor run in the order made: a job's reports stay in order.)"""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str, dict[str, Any]]] = []
        self.cancels: set[str] = set()

    def report(self, job_id: str, kind: str, values: dict[str, Any]) -> None:
        self.reports.append((job_id, kind, values))

    def take(self) -> list[tuple[str, str, dict[str, Any]]]:
        reports, self.reports = self.reports, []
        return reports

    def cancel(self, job_id: str) -> None:
        self.cancels.add(job_id)

    def cancelled(self, job_id: str) -> bool:
        return job_id in self.cancels

    def forget(self, job_id: str) -> None:
        self.cancels.discard(job_id)


class BoardReporter:
    """A Ray task's reporter (worker.Reporter): progress and outcome to the board, cancels read from it. The
    board unreachable means its server is gone (Ray ends a driver's tasks with it, but a task may see it first)."""

    def __init__(self, board: Any, job_id: str):
        self.board, self.job_id = board, job_id
        self.checked = -float("inf")

    def progress(self, **values: Any) -> None:
        self.board.report.remote(self.job_id, "progress", values)

    def check(self) -> None:
        import ray

        from gigadiff import interrupts
        from gigadiff.serve.worker import ServerGone

        now = time.monotonic()
        if now - self.checked < CHECK_EVERY_S:
            return
        self.checked = now
        try:
            cancelled = ray.get(self.board.cancelled.remote(self.job_id), timeout=60)
        except ray.exceptions.RayError:
            raise ServerGone from None
        if cancelled:
            raise interrupts.Interrupted

    def finish(self, status: str, error: str | None = None, outputs: list[str] | None = None) -> None:
        import ray

        # waited for: the outcome is on the board before the task ends (and with it every earlier report)
        ray.get(self.board.report.remote(self.job_id, "finish", {"status": status, "error": error,
                                                                 "outputs": outputs}))  # fmt: skip


_CACHE: Any = None
"""The models this Ray worker process keeps between the jobs it runs (Ray reuses CPU task processes)."""


def run_on_ray(job: Job, config: ServeConfig, board: Any, server_address: str) -> None:
    """One job as a Ray task: run as a worker process runs it, on the node Ray placed it on (below the API's CPU
    priority on the server's own machine, as a worker process)."""
    import ray

    from gigadiff import interrupts
    from gigadiff.serve import log, worker

    global _CACHE
    log.setup()
    if _CACHE is None:
        _CACHE = worker.ModelCache(config.keep_models)
    reporter = BoardReporter(board, job.id)
    context, address = ray.get_runtime_context(), ray.util.get_node_ip_address()
    if address == server_address:
        worker.lower_priority()
    reporter.progress(runs_on=f"ray node {address} {context.get_node_id()[:12]}")
    device = "cuda" if ray.get_gpu_ids() else "cpu"
    interrupts.reset()
    worker.run_job(job, reporter, config, device, _CACHE)


def lost(error: Exception) -> str:
    """Why a job's task ended without an outcome, in words."""
    import ray

    if isinstance(error, ray.exceptions.NodeDiedError):
        return "its Ray node died"
    if isinstance(error, ray.exceptions.WorkerCrashedError):
        return "its Ray worker died"
    if isinstance(error, ray.exceptions.RayTaskError):
        return f"its Ray task failed ({first_line(error.cause if error.cause else error)})"
    return f"its Ray task was lost ({type(error).__name__})"


def connect(address: str) -> Any:
    """Ray, connected to the cluster at `address` (refused with what to do: no Ray, no cluster there); once per
    process."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every job's line in the server's log, never "repeated 2x"
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # a log file gets no colour codes
    try:
        import ray
    except ImportError:
        raise GigadiffError(f"{{ray}} needs Ray installed on this machine and the cluster's nodes: {RAY_SETUP}",
                            "ray") from None  # fmt: skip
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():  # Ray itself would retry an address where nothing answers for minutes
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_S).close()
        except OSError as e:
            raise GigadiffError(f"nothing answers at {{ray}} {address} ({e.strerror or e}): is the Ray cluster's head "
                                "running there (`ray start --head`)?", "ray") from None  # fmt: skip
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, namespace="gigadiff", logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise GigadiffError(f"cannot join the Ray cluster at {{ray}} {address}: {first_line(e)}", "ray") from None
    return ray


class RaySupervisor(Supervisor):
    """Jobs as Ray tasks: claimed while the cluster has room, their reports moved into the store, the lost ones
    queued again to resume elsewhere."""

    tick_s = RAY_TICK_S

    def __init__(self, config: ServeConfig):
        super().__init__(config, target=lambda *args: None)
        assert config.ray is not None
        self.address = config.ray
        self.board: Any = None
        self.task: Any = None
        self.here = ""
        """The server machine's address in the cluster (its tasks there run below the API's CPU priority)."""
        self.tasks: dict[Any, Job] = {}
        """The job of each task in flight."""
        self.cancelling: set[str] = set()
        self.capacity = self.per_node = 0
        self.resource = "CPU"
        self.measured = -float("inf")

    def start(self) -> None:
        ray = connect(self.address)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        self.here = ray.util.get_node_ip_address()  # the server machine's address in the cluster
        self.board = (ray.remote(Board).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            here, soft=False)).remote())  # fmt: skip
        self.task = ray.remote(max_retries=0)(run_on_ray)  # a lost job's attempts are counted here
        self._measure(time.monotonic())
        self.thread.start()

    def describe(self) -> str:
        return f"jobs on the Ray cluster at {self.address} ({self.nodes} node(s), {self.capacity} {self.resource})"

    def _measure(self, now: float) -> None:
        """The cluster's room: GPUs if it has any (else CPUs), in all and on its largest node."""
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.resource = "GPU" if any(r.get("GPU", 0) for r in nodes) else "CPU"
        counts = [int(r.get(self.resource, 0)) for r in nodes]
        self.nodes, self.capacity, self.per_node = len(nodes), sum(counts), max(counts, default=0)
        self.measured = now

    def _tend(self, now: float) -> None:
        import ray

        self._apply(ray.get(self.board.take.remote()))
        if self.tasks:
            ended, _ = ray.wait(list(self.tasks), num_returns=len(self.tasks), timeout=0)
            if ended:
                self._apply(ray.get(self.board.take.remote()))  # what they reported before they ended
            for task in ended:
                job = self.tasks.pop(task)
                try:
                    ray.get(task)
                except Exception as e:  # lost with its node or worker, or failed outside the job's own handling
                    reason = lost(e)
                    self._settle(self.store.orphaned(None, reason, self.config.max_attempts, job_id=job.id), reason)
                self.cancelling.discard(job.id)
                self.board.forget.remote(job.id)
            for job in self.tasks.values():
                if job.id not in self.cancelling and self.store.cancelled(job.id):
                    self.cancelling.add(job.id)
                    self.board.cancel.remote(job.id)
        if now - self.measured >= CAPACITY_EVERY_S:
            self._measure(now)
        self._dispatch()

    def _apply(self, reports: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Move a batch of reports into the store in order, in one transaction."""
        with self.store.together():
            for job_id, kind, values in reports:
                if kind == "finish":
                    self.store.finish(job_id, **values)
                else:
                    self.store.progress(job_id, **values)
                    if "runs_on" in values:
                        LOG.info("job %s runs on %s", job_id, values["runs_on"])

    def _dispatch(self) -> None:
        """Claim queued jobs while the cluster has room for them, each a task asking for its processes."""
        busy = sum(_processes(job) for job in self.tasks.values())
        while busy < self.capacity:
            job = self.store.claim(runs_on="ray: waiting for a node")
            if job is None:
                return
            processes = _processes(job)
            if processes > self.per_node:
                error = f"it asks for {processes} processes, and no node of the Ray cluster has {processes} " \
                        f"{self.resource}s"  # fmt: skip
                self.store.finish(job.id, "failed", error=error)
                LOG.info("job %s failed: %s", job.id, error)
                continue
            amount = {"num_gpus": processes} if self.resource == "GPU" else {"num_cpus": processes}
            task = self.task.options(**amount).remote(job, self.config, self.board, self.here)
            self.tasks[task] = job
            busy += processes

    def stop(self, grace_s: float) -> None:
        """Stop claiming, end the tasks (their jobs resume at the next start), leave the cluster."""
        import ray

        self.stopping.set()
        self.thread.join(grace_s)
        for task in self.tasks:
            ray.cancel(task, force=True)
        ray.shutdown()


def _processes(job: Job) -> int:
    return int(job.request.get("processes") or 1)
