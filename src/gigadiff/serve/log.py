"""The service's log: a line for each thing that happens to a job (queued, refused, started, done, failed,
cancelled) and to the server (started, stopping, stopped), on stderr with the time, from the API process and
its workers alike, so that an operator can follow a server and see how long each job took."""

from __future__ import annotations

import logging
import sys
from typing import Any

LOG = logging.getLogger("gigadiff.serve")


def setup() -> None:
    """Log to stderr (once per process; workers are spawned processes and set it up again)."""
    if LOG.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s gigadiff serve: %(message)s", "%Y-%m-%d %H:%M:%S"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


def describe(request: dict[str, Any]) -> str:
    """What a job asks for, in a few words (never its prompt: logs are often kept longer than jobs)."""
    parts = [f"model {request.get('model', 'sd15')}"]
    for key in ("size", "steps", "processes"):
        if request.get(key) is not None:
            parts.append(f"{key} {request[key]}")
    return ", ".join(parts)
