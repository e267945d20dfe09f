"""Device and dtype choice, decided once before a model is loaded."""

from __future__ import annotations

import torch

from gigadiff.errors import GigadiffError

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GigadiffError(f"device {name!r} requested but CUDA is not available on this machine")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise GigadiffError("device 'mps' requested but Apple MPS is not available on this machine")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise GigadiffError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp16 is refused on the CPU, where many of its kernels are missing or slower than fp32."""
    if name not in DTYPES:
        raise GigadiffError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    if name == "fp16" and device.type == "cpu":
        raise GigadiffError("dtype fp16 is not supported on the CPU; use fp32 or bf16")
    return DTYPES[name]
