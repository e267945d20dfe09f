"""Speed on a GPU: the denoiser's repeated blocks compiled, and diffusers' attention backends.

`--compile` compiles each repeated block of the denoiser (its transformer blocks) with `torch.compile`, as
diffusers' `compile_repeated_blocks` does (regional compilation: one compiled graph serves every block of a
kind, so compiling takes seconds rather than the minutes a whole-model compile takes). gigadiff calls the
denoiser with one fixed shape for the whole run (tiles of one size, one batch), so the graphs compile once.
Denoisers that declare no repeated blocks (SD3's, PixArt's, SANA's) have their blocks found as the members of
their block lists.

`--attention NAME` sets diffusers' attention backend (native, flash, sage, xformers, flex, ...) on every
attention of the denoiser that dispatches through diffusers (the DiTs); where none does (the UNets of SD and
SDXL call PyTorch's attention directly), the option is refused rather than ignored.
"""

from __future__ import annotations

from typing import Any

from gigadiff.errors import GigadiffError, first_line


def compile_denoiser(denoiser: Any) -> int:
    """Compile the denoiser's repeated blocks in place; returns how many were compiled."""
    import torch

    kinds = set(getattr(denoiser, "_repeated_blocks", None) or ())
    if not kinds:
        kinds = {type(block).__name__ for child in denoiser.children() if isinstance(child, torch.nn.ModuleList)
                 for block in child}  # fmt: skip
    blocks = [m for m in denoiser.modules() if type(m).__name__ in kinds]
    if not blocks:
        raise GigadiffError(f"{{compile}}: the {type(denoiser).__name__} has no repeated blocks to compile",
                            "compile")  # fmt: skip
    for block in blocks:
        block.compile()
    return len(blocks)


def check_attention(name: str) -> None:
    """Refuse a backend whose package is missing on this machine (flash-attn, sageattention, xformers), before
    any weights load."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (ImportError, RuntimeError, ValueError) as e:
        first = first_line(e, None)
        raise GigadiffError(f"{{attention}} {name}: {first}", "attention") from e


def set_attention(denoiser: Any, name: str) -> None:
    """Route every attention of the denoiser that dispatches through diffusers to backend `name`."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    dispatching = [m for m in denoiser.modules() if isinstance(m, (Attention, AttentionModuleMixin))
                   and hasattr(getattr(m, "processor", None), "_attention_backend")]  # fmt: skip
    if not dispatching:
        raise GigadiffError(f"{{attention}}: the {type(denoiser).__name__}'s attention calls PyTorch's directly, "
                            "not through diffusers' attention backends; remove {attention}", "attention")  # fmt: skip
    denoiser.set_attention_backend(name)
