"""How a model's weights are loaded and where they live: what `--device`, `--dtype`, `--offload`, `--quantize`,
`--quantize-text` and `--transformer` ask for, in one value that the run layer builds and every family's `load`
takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    quantize_text: str = "none"
    """none, int8, fp8 or nf4: the text encoders' weights quantized as they load."""
    compile: bool = False
    """Compile the denoiser's repeated blocks (gigadiff.backends.speed)."""
    attention: str = "auto"
    """diffusers' attention backend for the denoiser (auto: the model's own)."""
    loras: tuple[str, ...] = ()
    """LoRA files with their scales, `FILE[:SCALE]` (gigadiff.backends.lora)."""
    controlnets: tuple[str, ...] = ()
    """ControlNet models to load beside the pipeline (gigadiff.backends.control; their images are the run's)."""

    def recorded(self, quantized: bool = False) -> dict[str, Any]:
        """What the metadata records of these choices beyond what the loaded model shows (its dtype, offloading
        and quantization are read from it): the denoiser's file and digest, compilation, attention backend, the
        LoRAs (fused unless the weights are `quantized`)."""
        from gigadiff.backends.lora import describe_loras, parse_lora
        from gigadiff.backends.quantized import describe_file

        record = describe_file(self.transformer) if self.transformer is not None else {}
        if self.loras:
            record["loras"] = describe_loras([parse_lora(text) for text in self.loras], fused=not quantized)
        if self.controlnets:
            record["controlnets"] = list(self.controlnets)
        if self.compile:
            record["compile"] = True
        if self.attention != "auto":
            record["attention"] = self.attention
        if self.quantize_text != "none":
            record["text_encoders_quantized"] = self.quantize_text
        return record
