"""`gigadiff serve`: the API process and one worker process per device, over one data folder.

Before anything starts, the port is bound (a busy port is an error, not a traceback from uvicorn later) and the
data folder is locked: a second server on the same folder would put the first one's running jobs back in the
queue. Jobs a killed server left running are queued again (`JobStore.recover`) and resume from their last
checkpoint. The API runs in this process (uvicorn, on the socket bound here); the workers end when it does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
from collections.abc import Iterator
from typing import IO, Any

from gigadiff.errors import GigadiffError
from gigadiff.serve.config import ServeConfig

SHUTDOWN_S = 3


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GigadiffError(f"cannot listen on {host}:{port} ({e.strerror}): is another server using it? Give "
                            "another {port}", "port") from None  # fmt: skip
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def locked(config: ServeConfig) -> Iterator[None]:
    """Hold the data folder for this server (released when the process ends, however it ends)."""
    config.data.mkdir(parents=True, exist_ok=True)
    lock: IO[str] = open(config.data / "serve.lock", "a+")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "?"
        lock.close()
        raise GigadiffError(f"{{data}} {config.data} is in use by another gigadiff serve (pid {owner})",
                            "data") from None  # fmt: skip
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    try:
        yield
    finally:
        lock.close()


def worker_process(config: ServeConfig, device: str, parent: int) -> None:
    """A worker's entry point: Ctrl-C is the server's to handle; SIGTERM (the server stopping) ends it."""
    from gigadiff.serve import log, worker

    log.setup()
    worker.lower_priority()

    def stop(signum: int, frame: Any) -> None:
        raise worker.ServerGone

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(worker.ServerGone):  # stopped while still starting: nothing to report
        worker.main(config, device, parent)


def serve(config: ServeConfig, announce: Any = print) -> None:
    """Run the service until it is stopped (Ctrl-C or SIGTERM)."""
    import uvicorn

    from gigadiff.serve import log, ray_pool
    from gigadiff.serve.app import VIEWER_SETUP, create_app, viewer_installed
    from gigadiff.serve.supervisor import Supervisor

    if config.ray is not None:  # joined before anything is made: a cluster that is not there stops the server here
        ray_pool.connect(config.ray)
    sock = bind(config.host, config.port)
    with locked(config):
        config.jobs.mkdir(parents=True, exist_ok=True)
        log.setup()
        supervisor = Supervisor(config, worker_process) if config.ray is None else ray_pool.RaySupervisor(config)
        recovered = supervisor.recover()
        app = create_app(config)
        supervisor.start()
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if config.tls else "http"
        interrupted = ", ".join(f"{len(jobs)} {status}" for status, jobs in recovered.items() if jobs)
        announce(f"gigadiff serve: {scheme}://{shown}:{port}/ (API docs at /docs), data in {config.data}, "
                 f"{supervisor.describe()}"
                 + (f"; jobs the last server left running: {interrupted}" if interrupted else ""))  # fmt: skip
        if not viewer_installed():
            announce(f"warning: the page's Deep Zoom viewer is not installed (run: {VIEWER_SETUP}); the API works")
        sys.stdout.flush()
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_S,
                                               ssl_certfile=str(config.tls_cert) if config.tls else None,
                                               ssl_keyfile=str(config.tls_key) if config.tls else None))  # fmt: skip
        try:
            server.run(sockets=[sock])
        finally:
            running = supervisor.store.counts().get("running", 0)
            log.LOG.info("stopping%s", f": {running} running job(s) resume at the next start" if running else "")
            supervisor.stop(SHUTDOWN_S)
            log.LOG.info("stopped")
