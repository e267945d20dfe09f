"""A `gigadiff serve` process for tests and benchmarks: started on a free port, stopped with its workers."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCAL = "http://127.0.0.1:8000"
"""The address in-process test clients send as Host: a loopback server answers loopback names only."""


@contextlib.contextmanager
def served(data: Path, *args: str, start_timeout: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """A `gigadiff serve` process on a free port, in its own process group: yields (url, process); stopped (its
    workers with it) on exit. Its output goes to `data`/../serve.log."""
    log_path = data.parent / f"{data.name}.serve.log"
    start = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gigadiff", "serve", "--data", str(data), "--port", "0", *args],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            text = log_path.read_bytes()[start:].decode(errors="replace")
            found = re.search(r"gigadiff serve: (https?://\S+/)", text)
            if found:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gigadiff serve did not start (exit {proc.poll()}):\n{text[-3000:]}")
            time.sleep(0.1)
        yield found[1].rstrip("/"), proc
    finally:
        stop_served(proc)


def stop_served(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a served process group (SIGKILL: as a crash would)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):  # workers of a killed server
        os.killpg(proc.pid, signal.SIGKILL)
