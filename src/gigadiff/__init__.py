"""gigadiff: images of any size from diffusion models, by synchronized tiled denoising of one latent canvas.

The public names are imported lazily so that `gigadiff --version` and argument errors answer at once,
without importing torch and diffusers first.
"""

from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "generate": "gigadiff.api",
    "generate_result": "gigadiff.api",
    "open_backend": "gigadiff.api",
    "resume_result": "gigadiff.api",
    "GenerationResult": "gigadiff.runs.result",
    "GenerationSettings": "gigadiff.settings",
    "GigadiffError": "gigadiff.errors",
    "RunRequest": "gigadiff.options",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'gigadiff' has no attribute {name!r}")
