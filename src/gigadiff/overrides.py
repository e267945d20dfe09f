"""Changing one method of one module instance for a while, leaving its class and every other instance alone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def instance_override(module: Any, name: str, value: Any) -> Iterator[None]:
    """While inside, `module.name` is `value` for this instance only (shadowing its class's method); the
    class's own is back on exit, even on error. How an adapter changes one step of a diffusers model (its
    position ids or table crop) without copying the model's forward, and how a tiled pass skips the stages whose
    output a tile already has."""
    setattr(module, name, value)
    try:
        yield
    finally:
        delattr(module, name)
