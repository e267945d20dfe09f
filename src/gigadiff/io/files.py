"""Safe output files: checked before compute, written atomically, never overwritten unless asked.

`check_outputs` runs before any model is loaded so that an unwritable or already-existing output is reported
in the first second, not after an hour. `publish` writes through a temporary file in the destination folder
and moves it into place at the end, so a crash or an interrupt never leaves a half-written file under the user's
name, and (without `overwrite`) a file that appeared meanwhile is still not replaced.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from gigadiff import interrupts
from gigadiff.errors import GigadiffError


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar next to an output (every writer leaves one)."""
    return path.with_suffix(".json")


def relief_path(path: Path) -> Path:
    """The shaded relief written beside a heightmap."""
    return path.with_name(f"{path.stem}.relief.png")


def check_outputs(paths: Iterable[Path], overwrite: bool) -> None:
    for path in paths:
        if path.is_dir():
            raise GigadiffError(f"output {path} is a directory; give a file name")
        if path.exists() and not overwrite:
            raise GigadiffError(f"output {path} already exists; pass {{overwrite}} to replace it", "overwrite")
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise GigadiffError(f"cannot write {path}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise GigadiffError(f"cannot write {path}: folder {folder} is not writable")
        if path.exists() and not os.access(path, os.W_OK):
            raise GigadiffError(f"cannot write {path}: the existing file is not writable")
        _try_new_file(path, folder)


def _try_new_file(path: Path, folder: Path) -> None:
    """Create and remove the temporary file `publish` will write, so that a folder that refuses new files (a
    read-only mount, /proc, a full disk's quota) is reported now rather than after the run."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + path.suffix, dir=folder)
    except OSError as e:
        raise GigadiffError(f"cannot write {path}: folder {folder} takes no new file ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(path: Path, write: Callable[[Path], object], overwrite: bool) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then move it to `path`."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    interrupts.temporary(tmp)
    try:
        write(tmp)
        interrupts.placing()  # an interrupted run never moves a file into place (unless its outputs are committed)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists: never clobbers
            except FileExistsError:
                raise GigadiffError(f"output {path} appeared while generating; not overwriting it") from None
            except OSError:  # file systems without hard links
                if path.exists():
                    raise GigadiffError(f"output {path} appeared while generating; not overwriting it") from None
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        interrupts.released(tmp)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex (read in blocks: model files are gigabytes)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
