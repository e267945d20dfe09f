"""User-facing errors.

Everything a user can get wrong (sizes, paths, model names, options) raises `GigadiffError` *before* any
model is run. The CLI turns it into a one-line message and exit code 2; the Python API lets it propagate;
the service answers 400 with the CLI's message. It subclasses `ValueError` so callers that already catch bad
arguments keep working.

An error about a request field names the field through a placeholder (`{tile_batch} must be at least 1`):
the run layer below the front ends only knows field names, and each front end renders them its own way
(`tile_batch` in Python, `--tile-batch` on the command line). `str(error)` renders plain field names;
other braces in the message (a path, JSON) are left as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_FIELD = re.compile(r"\{(\w+)\}")


def first_line(e: BaseException, limit: int | None = 300) -> str:
    """The first line of a library's exception (its type's name if it has no text), cut at `limit` characters:
    what a one-line error quotes of the cause."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


def render(template: str, fields: tuple[str, ...], name: Callable[[str], str] = str) -> str:
    """`template` with every named field written as `name(field)` (the API's plain names by default)."""
    if not fields:
        return template
    return _FIELD.sub(lambda m: name(m[1]) if m[1] in fields else m[0], template)


class GigadiffError(ValueError):
    """A problem with the user's input or environment, reported before compute starts."""

    def __init__(self, message: str, *fields: str):
        self.template = message
        self.fields = fields
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = str) -> str:
        """The message with every named field written as `name(field)` (the API's plain names by default)."""
        return render(self.template, self.fields, name)


@dataclass(frozen=True)
class Note:
    """Something a run tells its user before it starts without refusing it (a pipeline's rule it follows that the
    request did not expect), naming request fields as errors do."""

    template: str
    fields: tuple[str, ...] = ()

    def render(self, name: Callable[[str], str] = str) -> str:
        return render(self.template, self.fields, name)
