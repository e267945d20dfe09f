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
`check()` before the rename: an interrupted run never leaves a file under an output's name. A run's outputs are
placed as a group (`final_outputs`): once the first of them (the image) is in place, the run is committed, and an
interrupt no longer stops it: the others (sidecar, latents) follow and the run reports what it wrote, rather than
saying "interrupted" beside a complete image or leaving an image without its sidecar.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

EXIT_CODE = 130
DEADLINE_S = 1.5

_requested = threading.Event()
_reported = threading.Event()
_temporary: set[Path] = set()
_checkpoint: list[Path] = []
_placing = threading.Event()
"""Inside a run's `final_outputs`."""
_committed = threading.Event()
"""The first of a run's final outputs is in place: the others follow, and the run reports them, whatever happens."""


class Interrupted(BaseException):  # not an error: what the user asked for
    """The user interrupted the run (Ctrl-C, SIGINT)."""


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """Raise `Interrupted` if the user has interrupted the run (a safe point of a long computation), unless the
    run's outputs are committed."""
    if _requested.is_set() and not _committed.is_set():
        raise Interrupted


@contextlib.contextmanager
def final_outputs() -> Iterator[None]:
    """A run's outputs being placed: see `placing`. A committed run stays so until `reset` (or the process ends):
    it still has to say what it wrote."""
    _placing.set()
    try:
        yield
    finally:
        _placing.clear()


def placing() -> None:
    """An output is about to be renamed into place: stop here if interrupted; else, inside `final_outputs`, the run
    is committed from here on (a SIGINT before this call stops the run with nothing placed)."""
    check()
    if _placing.is_set():
        _committed.set()


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
    if _committed.is_set():  # the outputs are being placed: they all will be, then the run ends
        _requested.set()
        return
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
    _placing.clear()
    _committed.clear()
