"""Heavy modules imported on first use, so that the checks before a run answer without them.

`import torch` takes about 3 s and `import diffusers` 6 s; a bad size or an unknown model must be reported
in a fraction of that. Modules that every command reaches (model families, the run layer) therefore name
torch through `LazyModule`: nothing is imported until an attribute is first read, and then the real module
serves every later access. It is the pattern of scientific Python's SPEC 1 (lazy loading), reduced to the one
thing needed here; type checkers see the real module (see `if TYPE_CHECKING` at the use sites).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])


class LazyModule:
    """Stands for the module `name`; imports it when one of its attributes is first read."""

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{' (loaded)' if self._module else ''}>"


torch: Any = LazyModule("torch")


def no_grad(fn: F) -> F:
    """`torch.no_grad()` as a decorator that needs no torch until the function is called."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return fn(*args, **kwargs)

    return cast(F, wrapper)  # functools.wraps keeps fn's signature; typing cannot say so
