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
from gigadiff.backends.source import ModelSource, hub_cut_off
from gigadiff.errors import GigadiffError

if TYPE_CHECKING:
    import torch

    from gigadiff.facts import ModelInfo


def quiet_libraries() -> None:
    """gigadiff's own progress is the one users read: silence diffusers' and transformers' bars and notices."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def load_pipeline(source: ModelSource, single_file_class: str, device: str, dtype: str,
                  info: ModelInfo | None = None) -> Any:  # fmt: skip
    """The pipeline of `source` on `device` in `dtype` (names as on the command line; `auto` from the model's
    `info`)."""
    import torch

    quiet_libraries()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device, *((info.gpu_dtype, info.fp16_risk) if info else ("fp32", "")))
    pipe = (
        _single_file(source, single_file_class, torch_dtype)
        if source.kind == "file"
        else _pretrained(source, torch_dtype)
    )
    pipe.set_progress_bar_config(disable=True)
    if torch_device.type == "cpu":
        return pipe.to(torch_device)
    for name, component in pipe.components.items():  # the text encoders stay on the host until they encode
        if isinstance(component, torch.nn.Module) and not name.startswith("text_encoder"):
            component.to(torch_device)
    return pipe


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def _pretrained(source: ModelSource, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    assert source.root is not None
    cut_off = "" if source.kind == "folder" else _cut_off()
    try:
        return DiffusionPipeline.from_pretrained(
            str(source.root) if source.kind == "folder" else source.location, dtype=dtype,
            local_files_only=source.kind == "folder" or bool(cut_off),
        )  # fmt: skip
    except Exception as e:
        raise GigadiffError(f"cannot load model {source.name!r}: {_first_line(e)}{cut_off}", "model") from e


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
            f"cannot load checkpoint {source.location} as {class_name}: {_first_line(e, 200)}{cut_off}. Single-file "
            "checkpoints need their model's config from the hub cache; convert it to a diffusers folder on a "
            "connected machine, or pass that folder with {model}",
            "model",
        ) from e


def weights_fingerprint(*modules: Any) -> str:
    """A short hash of the modules' configs and of a slice of the first module's first and last weights, so
    that a checkpoint is never resumed on other weights."""
    h = hashlib.sha256()
    for module in modules:
        h.update(json.dumps(dict(module.config), sort_keys=True, default=str).encode())
    params = list(modules[0].parameters())
    for p in (params[0], params[-1]):
        h.update(p.detach().flatten()[:4096].to("cpu").float().numpy().tobytes())
    return h.hexdigest()[:16]
