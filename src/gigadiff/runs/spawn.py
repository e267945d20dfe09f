"""`--processes N` without a launcher: start the run's N processes under torchrun, on this machine's devices.

Each process runs the run's record (`gigadiff _run FILE`), so they all run exactly the resolved request, seed
included; the record goes through a temporary file next to the output, removed when the processes end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gigadiff.checkpoint import Checkpoint
    from gigadiff.runs.resolve import Run


def spawn(run: Run, resume: Checkpoint | None = None) -> int:
    """Run `run` on its processes; returns their exit code (0 when every process succeeded)."""
    folder = run.outputs.image.parent if str(run.outputs.image.parent) else Path(".")
    fd, name = tempfile.mkstemp(prefix=".gigadiff-run.", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(run.record(), f)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={run.request.processes}", "-m", "gigadiff", "_run", name]  # fmt: skip
        if resume is not None and run.outputs.checkpoint is not None:
            command += ["--resume", str(run.outputs.checkpoint)]
        return subprocess.run(command, check=False).returncode
    finally:
        Path(name).unlink(missing_ok=True)
