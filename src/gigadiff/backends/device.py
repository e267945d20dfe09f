"""Device and dtype choice, decided once before a model is loaded.

The names are checked without torch (`check_device_name`, DTYPE_NAMES); what the machine has (CUDA, MPS) is
asked of torch when the model is about to load.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from gigadiff.errors import GigadiffError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPE_NAMES = ("auto", "fp32", "fp16", "bf16")
_CUDA_INDEX = re.compile(r"^cuda:\d+$")


def check_device_name(name: str) -> None:
    """Refuse a device name that can never work, before anything is loaded."""
    if name not in DEVICES and not _CUDA_INDEX.match(name):
        raise GigadiffError(f"unknown {{device}} {name!r}; choose one of: {', '.join(DEVICES)} (or cuda:N)", "device")


def check_dtype_name(name: str) -> None:
    if name not in DTYPE_NAMES:
        raise GigadiffError(f"unknown {{dtype}} {name!r}; choose one of: {', '.join(DTYPE_NAMES)}", "dtype")


def mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU; an explicit device that is absent is an error."""
    import torch

    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GigadiffError(f"{{device}} {name!r} requested but CUDA is not available on this machine", "device")
        return torch.device(name)
    if name == "mps" and not mps_available():
        raise GigadiffError("{device} 'mps' requested but Apple MPS is not available on this machine", "device")
    return torch.device(name)


def auto_dtype(device_type: str, preferred: str, fp16_risk: str = "", bf16_supported: bool = True) -> str:
    """What `--dtype auto` runs a model in: fp32 on the CPU (its fp16 kernels are missing or slow, its bf16 ones
    slower than fp32); on a GPU the dtype the model's diffusers pipeline runs in (`preferred`: fp16 for SD and
    SDXL, bf16 for the DiTs), bf16 becoming fp16 where the GPU has no bf16 (before Ampere) unless fp16 overflows
    for the model (`fp16_risk`), then fp32."""
    if device_type == "cpu" or preferred == "fp32":
        return "fp32"
    if preferred == "bf16" and not bf16_supported:
        return "fp32" if fp16_risk else "fp16"
    return preferred


def resolve_dtype(name: str, device: torch.device, preferred: str = "fp32", fp16_risk: str = "") -> torch.dtype:
    """The torch dtype of `name` on `device` (`auto`: see auto_dtype); fp16 is refused on the CPU, where many of
    its kernels are missing or slower than fp32."""
    import torch

    check_dtype_name(name)
    if name == "auto":
        bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
        name = auto_dtype(device.type, preferred, fp16_risk, bf16)
    if name == "fp16" and device.type == "cpu":
        raise GigadiffError("{dtype} fp16 is not supported on the CPU; use fp32 or bf16", "dtype")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    """ "fp32", "fp16" or "bf16" for a torch dtype (as the command line names them)."""
    import torch

    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
