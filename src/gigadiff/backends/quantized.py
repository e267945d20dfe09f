"""The denoiser's weights as people download or shrink them: a single file beside a diffusers model
(`--transformer`: a GGUF of FLUX.1, FLUX.2, Qwen-Image, Z-Image or SD3.5, or a .safetensors checkpoint such as an
fp8 one), or quantized as it loads (`--quantize int8|fp8|nf4`), all through diffusers' quantizers.

The denoiser is most of the weights (FLUX.1's 12 B of 17 B) and the only model called at every step. The text
encoders run once per run and are offloaded between encodings, but under model offloading each comes to the device
whole, and FLUX.2's 24 B Mistral is larger than most cards: `--quantize-text` quantizes them as they load,
through transformers' quantizers (the same int8/fp8/nf4). The VAE is small and stays as it is.
A pre-quantized diffusers folder (a `quantization_config` in its configs) loads as it is, with no option.

The checks that need no weights run first (`check_quantization`): nf4 needs bitsandbytes and CUDA, fp8 a GPU with
fp8 arithmetic (compute capability 8.9: Ada, Hopper and newer); a refusal says why and what to use instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gigadiff.errors import GigadiffError, first_line

if TYPE_CHECKING:
    import torch

    from gigadiff.backends.source import ModelSource

DENOISERS = ("transformer", "unet")
"""The pipeline components that are a family's denoiser."""
SINGLE_FILES = (".gguf", ".safetensors")
"""What `--transformer` takes."""
GGUF_MODELS = ("flux-dev", "flux-schnell", "flux-2-dev", "sd3", "sd35_medium", "sd35_large", "z-image-turbo")
"""diffusers' single-file model types whose GGUF transformers `--model x.gguf` runs with the rest of their hub
model (diffusers' default repository for the type)."""


def gguf_base_repo(path: Path) -> str | None:
    """The hub model a GGUF transformer belongs to, from its tensors' names and shapes (read from the file's header,
    never its weights) as diffusers recognises single files; None for a file of no type in GGUF_MODELS (one
    converted to diffusers' own names, or of a model gigadiff does not run from a GGUF alone)."""
    import gguf
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type

    class Shaped:
        def __init__(self, shape: tuple[int, ...]):
            self.shape = shape

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise GigadiffError(f"{{model}} {path} is not a readable GGUF file: {first_line(e)}", "model") from None
    tensors = {t.name: Shaped(tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}
    kind = infer_diffusers_model_type(tensors)
    return DIFFUSERS_DEFAULT_PIPELINE_PATHS[kind]["pretrained_model_name_or_path"] if kind in GGUF_MODELS else None


def check_transformer_file(path: str, quantize: str) -> None:
    """A `--transformer` file that cannot be one, refused before anything loads."""
    file = Path(path).expanduser()
    if file.suffix not in SINGLE_FILES:
        raise GigadiffError(f"{{transformer}} {path!r} must be a .gguf or .safetensors file", "transformer")
    if not file.is_file():
        raise GigadiffError(f"{{transformer}} file {file} does not exist", "transformer")
    if file.suffix == ".gguf" and quantize != "none":
        raise GigadiffError("a GGUF file is quantized already: drop {quantize}", "quantize", "transformer")


def check_quantization(quantize: str, device: torch.device, field: str = "quantize") -> None:
    """Refuse what cannot run on `device` before any weights load (see the module docstring); `field`: the option
    that asked (`quantize`, the denoiser's; `quantize_text`, the text encoders')."""
    import importlib.util

    import torch

    option = "{" + field + "}"
    if quantize == "nf4":
        if device.type != "cuda":
            instead = " or a GGUF Q4 file with {transformer}" if field == "quantize" else ""
            raise GigadiffError(f"{option} nf4 uses bitsandbytes' CUDA kernels: it needs an NVIDIA GPU; use {option} "
                                f"int8 here{instead}", field)  # fmt: skip
        if importlib.util.find_spec("bitsandbytes") is None:
            raise GigadiffError(f"{option} nf4 needs bitsandbytes: pip install bitsandbytes", field)
    if quantize == "fp8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
        instead = ", or an fp8 checkpoint with {transformer} (its weights are upcast as they load)"
        raise GigadiffError(f"{option} fp8 needs a GPU with fp8 arithmetic (compute capability 8.9: Ada, Hopper or "
                            f"newer); use {option} int8{instead if field == 'quantize' else ''}", field)  # fmt: skip


def quantization_config(quantize: str, dtype: torch.dtype) -> Any:
    """diffusers' quantization config for `--quantize` (None for `none`)."""
    if quantize == "none":
        return None
    if quantize == "nf4":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig() if quantize == "int8" else Float8WeightOnlyConfig())


def text_quantization_config(quantize: str, dtype: torch.dtype) -> Any:
    """transformers' quantization config for `--quantize-text` (the text encoders are transformers models)."""
    if quantize == "nf4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig() if quantize == "int8" else Float8WeightOnlyConfig())


def load_text_encoders(source: ModelSource, quantize: str, dtype: torch.dtype) -> dict[str, Any]:
    """The model's text encoders quantized as they load, as `from_pretrained`'s overrides ({} for `none`): they run
    once per run, but a 24 B encoder (FLUX.2's Mistral) must come to the device whole under model offloading."""
    import importlib

    if quantize == "none":
        return {}
    if source.kind == "file" or source.root is None:
        raise GigadiffError("{quantize_text} applies to a diffusers folder or hub model: convert the single-file "
                            "checkpoint to a folder first", "quantize_text")  # fmt: skip
    encoders = {name: spec for name, spec in source.index.items() if name.startswith("text_encoder")
                and isinstance(spec, list) and spec[0] == "transformers"}  # fmt: skip
    if not encoders:
        raise GigadiffError(f"model {source.name!r} has no transformers text encoder to quantize", "quantize_text")
    config = text_quantization_config(quantize, dtype)
    return {name: getattr(importlib.import_module(library), class_name).from_pretrained(
                str(source.root), subfolder=name, quantization_config=config, dtype=dtype, local_files_only=True)
            for name, (library, class_name) in encoders.items()}  # fmt: skip


def denoiser_name(source: ModelSource) -> str:
    """Which component of the model is its denoiser."""
    name = next((n for n in DENOISERS if n in source.index), None)
    if name is None:
        raise GigadiffError(f"model {source.name!r} has no transformer or unet to replace or quantize", "model")
    return name


def load_denoiser(source: ModelSource, quantize: str, transformer: str | None, dtype: torch.dtype,
                  local_only: bool) -> dict[str, Any]:  # fmt: skip
    """The denoiser as `from_pretrained`'s override ({component name: model}; {} when neither option is given):
    from the single file `transformer` (GGUF through `GGUFQuantizationConfig`, its config from the model), or
    the model's own, quantized as it loads."""
    import diffusers

    if transformer is None and quantize == "none":
        return {}
    if source.kind == "file" or source.root is None:
        raise GigadiffError("{transformer} and {quantize} apply to a diffusers folder or hub model: convert the "
                            "single-file checkpoint to a folder first", "transformer", "quantize")  # fmt: skip
    name = denoiser_name(source)
    cls = getattr(diffusers, source.index[name][1])
    config = quantization_config(quantize, dtype)
    if transformer is None:
        return {name: cls.from_pretrained(str(source.root), subfolder=name, quantization_config=config,
                                          dtype=dtype, local_files_only=True)}  # fmt: skip
    check_transformer_file(transformer, quantize)
    path = str(Path(transformer).expanduser())
    if path.endswith(".gguf"):
        from diffusers import GGUFQuantizationConfig

        config = GGUFQuantizationConfig(compute_dtype=dtype)
    try:
        model = cls.from_single_file(path, config=str(source.root), subfolder=name, quantization_config=config,
                                     dtype=dtype, local_files_only=local_only)  # fmt: skip
    except Exception as e:
        first = first_line(e)
        raise GigadiffError(f"cannot load {{transformer}} {path} as the {cls.__name__} of {source.name!r}: {first}",
                            "transformer") from e  # fmt: skip
    return {name: model}


def describe_quantization(denoiser: Any) -> dict[str, Any]:
    """What the metadata records of the denoiser's quantization: the method, a GGUF's tensor types, torchao's
    configuration ({} for plain weights)."""
    record: dict[str, Any] = {}
    quantizer = getattr(denoiser, "hf_quantizer", None)
    if quantizer is not None:
        method = quantizer.quantization_config.quant_method
        record["quantization"] = getattr(method, "value", str(method))
        types = sorted({p.quant_type.name for p in denoiser.parameters() if hasattr(p, "quant_type")})
        if types:
            record["quantized_types"] = types
        quant_type = getattr(quantizer.quantization_config, "quant_type", None)
        if quant_type is not None and not isinstance(quant_type, str):
            quant_type = type(quant_type).__name__
        if quant_type:
            record["quant_type"] = quant_type
    return record


def describe_file(transformer: str) -> dict[str, Any]:
    """What the metadata records of a `--transformer` file: its name and digest."""
    return {"transformer": Path(transformer).name, "transformer_digest": file_digest(Path(transformer).expanduser())}


DIGEST_SPAN = 2**24
"""Bytes read from each end of a weight file for its digest."""


def file_digest(path: Path) -> str:
    """SHA-256 of a file's size and its first and last 16 MiB: tells two weight files apart (their headers and
    final tensors differ) in milliseconds, where hashing a 12 GB GGUF whole would take a minute per run."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(DIGEST_SPAN))
        if size > DIGEST_SPAN:
            f.seek(max(DIGEST_SPAN, size - DIGEST_SPAN))
            h.update(f.read(DIGEST_SPAN))
    return h.hexdigest()[:16]
