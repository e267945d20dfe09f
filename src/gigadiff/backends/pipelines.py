"""Loading diffusers pipelines for the families that run them, and what every diffusers adapter shares.

A folder or a cached hub snapshot loads with `DiffusionPipeline.from_pretrained` (local files only: the
config files were found before, see gigadiff.backends.source; a model not cached was downloaded then, and its
weights download here); a single file loads with its family's pipeline class `from_single_file`, which needs
the model's config from the hub cache. Any failure is a GigadiffError naming the model, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from gigadiff.backends.device import resolve_device, resolve_dtype
from gigadiff.backends.lora import apply_loras, check_loras, parse_lora
from gigadiff.backends.placement import host_tensor, place, placement
from gigadiff.backends.quantized import DENOISERS, check_quantization, load_denoiser, load_text_encoders
from gigadiff.backends.source import ModelSource, hub_cut_off
from gigadiff.backends.speed import check_attention, compile_denoiser, set_attention
from gigadiff.errors import GigadiffError, first_line

if TYPE_CHECKING:
    import torch

    from gigadiff.backends.loading import Loading
    from gigadiff.facts import ModelInfo


QUIET_LOGGERS = ("torchao", "torch.utils._pytree")
"""Loggers that speak when diffusers imports torchao: its CUDA-only extensions that a CPU build cannot load,
torch's notes on the types torchao registers. Nothing a user can act on."""


def quiet_libraries() -> None:
    """gigadiff's own progress is the one users read: silence diffusers' and transformers' bars and notices."""
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def load_pipeline(source: ModelSource, single_file_class: str, loading: Loading, info: ModelInfo | None = None) -> Any:
    """The pipeline of `source` on `loading.device` in `loading.dtype` (names as on the command line; `auto` from
    the model's `info`), its weights placed as `loading.offload` says (gigadiff.backends.placement)."""
    quiet_libraries()
    offload = loading.offload
    torch_device = resolve_device(loading.device)
    torch_dtype = resolve_dtype(loading.dtype, torch_device,
                                *((info.gpu_dtype, info.fp16_risk) if info else ("fp32", "")))  # fmt: skip
    check_quantization(loading.quantize, torch_device)
    check_quantization(loading.quantize_text, torch_device, "quantize_text")
    if loading.attention != "auto":
        check_attention(loading.attention)
    loras = [parse_lora(text) for text in loading.loras]
    check_loras(source, loras)
    overrides = load_denoiser(source, loading.quantize, loading.transformer, torch_dtype, bool(_cut_off()))
    overrides.update(load_text_encoders(source, loading.quantize_text, torch_dtype))
    pipe = (
        _single_file(source, single_file_class, torch_dtype)
        if source.kind == "file"
        else _pretrained(source, torch_dtype, overrides)
    )
    pipe.set_progress_bar_config(disable=True)
    apply_loras(pipe, loras)
    place(pipe, torch_device, placement(offload, pipe, torch_device))
    denoiser = next(pipe.components[name] for name in DENOISERS if name in pipe.components)
    if loading.attention != "auto":
        set_attention(denoiser, loading.attention)
    if loading.compile:
        compile_denoiser(denoiser)
    return pipe


def _pretrained(source: ModelSource, dtype: torch.dtype, overrides: dict[str, Any]) -> Any:
    from diffusers import DiffusionPipeline

    assert source.root is not None
    cut_off = "" if source.kind == "folder" else _cut_off()
    try:
        return DiffusionPipeline.from_pretrained(
            str(source.root) if source.kind == "folder" else source.location, dtype=dtype,
            local_files_only=source.kind == "folder" or bool(cut_off), **overrides,
        )  # fmt: skip
    except Exception as e:
        raise GigadiffError(f"cannot load model {source.name!r}: {first_line(e)}{cut_off}", "model") from e


def _cut_off() -> str:
    """Why only the local cache is read, as the end of an error message ("" when the hub may be asked)."""
    reason = hub_cut_off()
    return f" ({reason}: only the local cache is read)" if reason else ""


def _single_file(source: ModelSource, class_name: str, dtype: torch.dtype) -> Any:
    import diffusers

    cls = getattr(diffusers, class_name)
    cut_off = _cut_off()
    try:
        return cls.from_single_file(source.location, dtype=dtype, local_files_only=bool(cut_off))
    except Exception as e:  # the config lookup needs the hub unless it is cached; a damaged file fails here too
        raise GigadiffError(
            f"cannot load checkpoint {source.location} as {class_name}: {first_line(e, 200)}{cut_off}. Single-file "
            "checkpoints need their model's config from the hub cache; convert it to a diffusers folder on a "
            "connected machine, or pass that folder with {model}",
            "model",
        ) from e


def weights_fingerprint(*modules: Any, quantization: dict[str, Any] | None = None) -> str:
    """A short hash of the modules' configs, of the first module's `quantization` and of a slice of its first and
    last plain weights (quantized tensors, GGUF's and torchao's, are left out: their layouts are the
    quantizer's), so that a checkpoint is never resumed on other weights."""
    import torch

    h = hashlib.sha256()
    for module in modules:
        h.update(json.dumps(dict(module.config), sort_keys=True, default=str).encode())
    h.update(json.dumps(quantization or {}, sort_keys=True).encode())
    names = [name for name, p in modules[0].named_parameters() if type(p) is torch.nn.Parameter]
    for name in (names[0], names[-1]):
        p = host_tensor(modules[0], name)
        if p.device.type == "meta":
            continue
        h.update(p.detach().flatten()[:4096].to("cpu").float().numpy().tobytes())
    return h.hexdigest()[:16]
