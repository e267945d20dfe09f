"""Ctrl-C at any moment: the run ends within two seconds, with one line, exit code 130 and nothing half-written.

Python's own KeyboardInterrupt is not enough for that. It lands wherever the interpreter happens to be: in a
library's cleanup code, where it is swallowed ("Exception ignored in ...") and the run goes on to write its
image with exit 0; in click, which turns it into "Aborted!" and exit 1; or during an import, as a traceback.
So the first SIGINT here

1. sets a flag that the run checks at its safe points (every denoising step and model call, every VAE tile,
   before a file is moved into place: `check()`), so a swallowed interrupt still stops it at the next one;
2. raises `Interrupted` in the main thread (a BaseException: `except Exception` in libraries lets it through,
   and click does not catch it), which the entry point turns into one line and exit 130;
3. starts a deadline: if the process has not ended after DEADLINE_S (a long native call that does not return
   to Python), the temporary files of outputs being written are removed, the line printed, and the process ends
   with 130 anyway. A second Ctrl-C ends it the same way at once.

Outputs are written to temporary files and renamed into place (gigadiff.io.files), and `publish` calls
`check()` before the rename: an interrupted run never leaves a file under an output's name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

EXIT_CODE = 130
DEADLINE_S = 1.5

_requested = threading.Event()
_reported = threading.Event()
_temporary: set[Path] = set()
_checkpoint: list[Path] = []


class Interrupted(BaseException):  # not an error: what the user asked for
    """The user interrupted the run (Ctrl-C, SIGINT)."""


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """Raise `Interrupted` if the user has interrupted the run (a safe point of a long computation)."""
    if _requested.is_set():
        raise Interrupted


def message() -> str:
    """The one line printed for an interrupted run, saying how to resume when a checkpoint exists."""
    saved = [p for p in _checkpoint if p.is_file()]
    if saved:
        return f"interrupted; resume with: gigadiff resume {saved[-1]}"
    return "interrupted"


def report() -> None:
    """Print the line, once (the entry point, or the deadline, whichever comes first)."""
    if not _reported.is_set():
        _reported.set()
        sys.stderr.write(f"\n{message()}\n")
        sys.stderr.flush()


def note_checkpoint(path: Path | None) -> None:
    """The run's checkpoint file, named in the message if it exists when the run is interrupted."""
    _checkpoint.clear()
    if path is not None:
        _checkpoint.append(path)


def temporary(path: Path) -> None:
    """A temporary file being written: removed if the process has to end before it is moved into place."""
    _temporary.add(path)


def released(path: Path) -> None:
    _temporary.discard(path)


def _force_exit() -> None:
    for path in list(_temporary):
        with contextlib.suppress(OSError):
            path.unlink()
    with contextlib.suppress(Exception):
        report()
    os._exit(EXIT_CODE)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _requested.is_set():  # the second Ctrl-C: at once
        _force_exit()
    _requested.set()
    timer = threading.Timer(DEADLINE_S, _force_exit)
    timer.daemon = True
    timer.start()
    raise Interrupted


def install() -> None:
    """Handle SIGINT as described above (from the main thread, as early as possible)."""
    signal.signal(signal.SIGINT, _on_sigint)


def reset() -> None:
    """Forget an interrupt (tests, and a service that runs many jobs in one process)."""
    _requested.clear()
    _reported.clear()
    _temporary.clear()
    _checkpoint.clear()
