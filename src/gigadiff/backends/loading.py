"""How a model's weights are loaded and where they live: what `--device`, `--dtype`, `--offload`, `--quantize`
and `--transformer` ask for, in one value that the run layer builds and every family's `load` takes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loading:
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps (gigadiff.backends.device)."""
    dtype: str = "auto"
    """auto, fp32, fp16 or bf16: what the weights are computed in."""
    offload: str = "auto"
    """auto, none, model, group or sequential (gigadiff.backends.placement)."""
    quantize: str = "none"
    """none, int8, fp8 or nf4: the denoiser's weights quantized as they load (gigadiff.backends.quantized)."""
    transformer: str | None = None
    """A single file (GGUF or safetensors) holding the denoiser, the rest of the pipeline from the model."""
