"""LoRAs as people bring them: `--lora FILE[:SCALE]`, repeatable, loaded by the pipeline's own
`load_lora_weights` (diffusers converts kohya, A1111 and ComfyUI files to its own layout), in every family whose
diffusers pipeline loads LoRAs.

Before any weights load, each file is checked against the model (`check_loras`): its tensors are read and
converted by the pipeline class's `lora_state_dict`, and every adapted layer must exist in the model's modules
(built from their config files on the `meta` device) with the LoRA's input and output widths. A LoRA for another
family names layers the model does not have, or has them at other widths: it is refused, named, with the first
layer that does not match.

Loaded LoRAs are fused into the weights they adapt, at their scales: every denoiser call then costs what it costs
without LoRAs (unfused, each adapted layer runs its low-rank product at every call, for every tile). Weights the
quantizers hold (GGUF, torchao, bitsandbytes) cannot take a fused product: there the LoRAs stay as adapters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gigadiff.errors import GigadiffError, first_line

if TYPE_CHECKING:
    from gigadiff.backends.source import ModelSource

LORA_SUFFIX = re.compile(r"\.(lora(_[AB]|\.(down|up)|_(down|up)|_magnitude_vector)|alpha|dora_scale)(\.|$).*")
"""What follows an adapted layer's name in a LoRA's keys (diffusers/peft, kohya and A1111 spellings)."""
ATTENTION_PROCESSOR = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora\..*")
"""diffusers' older attention-processor spelling, which its kohya conversion gives: `attn1.processor.to_q_lora.down`
adapts `attn1.to_q` (`to_out_lora`: `to_out.0`)."""


@dataclass(frozen=True)
class Lora:
    path: str
    scale: float = 1.0

    @property
    def name(self) -> str:
        return Path(self.path).name


def parse_lora(text: str) -> Lora:
    """`FILE[:SCALE]` (a scale only where what follows the last colon is a number: paths may hold colons)."""
    path, colon, scale = text.rpartition(":")
    if colon:
        try:
            return Lora(path, float(scale))
        except ValueError:
            pass
    return Lora(text)


def check_lora_files(texts: list[str] | tuple[str, ...]) -> list[Lora]:
    """The `--lora` values as files that exist, refused otherwise (before anything loads)."""
    loras = [parse_lora(text) for text in texts]
    for lora in loras:
        path = Path(lora.path).expanduser()
        if path.suffix != ".safetensors":
            raise GigadiffError(f"{{lora}} {lora.path!r} must be a .safetensors file", "lora")
        if not path.is_file():
            raise GigadiffError(f"{{lora}} file {path} does not exist", "lora")
        if not -10 <= lora.scale <= 10:
            raise GigadiffError(f"{{lora}} {lora.name}: scale {lora.scale:g} must lie in [-10, 10]", "lora")
    return loras


def pipeline_class(source: ModelSource) -> Any:
    import diffusers

    return getattr(diffusers, source.index.get("_class_name", ""), None)


def check_loras(source: ModelSource, loras: list[Lora]) -> None:
    """Refuse LoRAs the model's pipeline cannot load or whose layers are not the model's (see the module
    docstring), before its weights load."""
    import torch

    from gigadiff.backends.footprint import meta_pipeline

    if not loras or source.root is None:
        return
    cls = pipeline_class(source)
    if cls is None or not hasattr(cls, "load_lora_weights"):
        what = source.index.get("_class_name", "this model")
        raise GigadiffError(f"{{lora}}: {what} has no LoRA loader in diffusers, so model {source.name!r} takes no "
                            "LoRAs", "lora")  # fmt: skip
    pipe = meta_pipeline(source.root, source.index, torch.float32)
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    for lora in loras:
        try:
            converted = cls.lora_state_dict(str(Path(lora.path).expanduser()))
        except Exception as e:
            first = first_line(e, 200)
            raise GigadiffError(f"{{lora}} {lora.name} cannot be read as a LoRA of {cls.__name__}: {first}",
                                "lora") from e  # fmt: skip
        state = converted[0] if isinstance(converted, tuple) else converted
        problem = _mismatch(state, modules)
        if problem:
            raise GigadiffError(f"{{lora}} {lora.name} is not a LoRA of model {source.name!r}: {problem}", "lora")


def _mismatch(state: dict[str, Any], modules: dict[str, Any]) -> str:
    """Why a converted LoRA state dict does not fit `modules` ("" when it does)."""
    import torch

    if not state:
        return "it holds no LoRA weights"
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        module_name = LORA_SUFFIX.sub("", ATTENTION_PROCESSOR.sub(_processor_layer, rest))
        if component not in modules:
            return f"it adapts {component!r}, which the model does not have"
        try:
            layer = modules[component].get_submodule(module_name)
        except AttributeError:
            return f"the model has no layer {component}.{module_name}"
        if isinstance(layer, torch.nn.Linear) and tensor.ndim == 2:
            down = ".lora_A." in key or "lora.down" in key or "lora_down" in key
            if down and tensor.shape[1] != layer.in_features:
                return f"{component}.{module_name} takes {layer.in_features} inputs, the LoRA {tensor.shape[1]}"
            if not down and tensor.shape[0] != layer.out_features and "lora" in key:
                return f"{component}.{module_name} gives {layer.out_features} outputs, the LoRA {tensor.shape[0]}"
    return ""


def _processor_layer(match: re.Match[str]) -> str:
    return "." + ("to_out.0" if match[1] == "to_out" else match[1])


def apply_loras(pipe: Any, loras: list[Lora]) -> None:
    """Load `loras` into `pipe` at their scales, fused where the weights allow it (see the module docstring)."""
    if not loras:
        return
    import warnings

    names = [f"lora{i}" for i in range(len(loras))]
    for lora, name in zip(loras, names, strict=True):
        with warnings.catch_warnings():  # peft's note that a model has adapters already: that is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(str(Path(lora.path).expanduser()), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    quantized = any(getattr(m, "hf_quantizer", None) is not None for m in pipe.components.values())
    if not quantized:
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()


def describe_loras(loras: list[Lora], fused: bool) -> list[dict[str, Any]]:
    """What the metadata records of each LoRA: file name, scale, SHA-256 (A1111's hash is its first 10 digits)."""
    from gigadiff.io.files import file_sha256

    return [{"file": lora.name, "scale": lora.scale, "sha256": file_sha256(Path(lora.path).expanduser()),
             "fused": fused} for lora in loras]  # fmt: skip
