"""Where a model comes from, and its config files, found without loading torch or any weights.

`--model` accepts a built-in model (`terrain`), a preset alias (sd15, flux-dev, ...), a Hugging Face hub id, a
local diffusers folder, or a single-file checkpoint (.safetensors / .ckpt). This module finds the files and
reads what the checks before a run need: a folder's `model_index.json` and its components' config files (from
the folder, or from the local hub cache, whose layout is `models--owner--name/snapshots/<revision>/`), or a
single file's tensor names (from the safetensors header: 8 bytes of length, then JSON). A model that is not
cached and cannot be reached fails here, in the first second, naming the model and how to provide it.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gigadiff.errors import GigadiffError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
MAX_HEADER = 100 * 2**20
"""A safetensors header larger than this is taken as a damaged file (real headers are a few MB at most)."""

SourceKind = Literal["builtin", "preset", "hub", "folder", "file", "object"]


@dataclass(frozen=True)
class ModelSource:
    """A model's location and the config files read from it."""

    name: str
    """What the user wrote (`--model`), as recorded in metadata."""
    kind: SourceKind
    location: str
    """The hub id (presets and hub ids), the folder or file path, or the built-in model's name."""
    root: Path | None = None
    """The local folder holding model_index.json (a diffusers folder or a cached hub snapshot)."""
    index: dict[str, Any] = field(default_factory=dict)
    """model_index.json ({} for single files and built-in models)."""
    file_keys: tuple[str, ...] = ()
    """Tensor names of a single-file .safetensors checkpoint."""
    preset: str | None = None
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Component configs given directly (a pipeline object passed to the Python API), read before the folder."""
    missing: str = ""
    """A preset not in the cache of an offline machine: why it cannot load (its family's declared defaults
    describe it meanwhile, so that a request's own errors are still reported first)."""

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name", ""))

    def config(self, component: str, filename: str = "config.json") -> dict[str, Any]:
        """A component's config file ({} when the source has none, e.g. a single file)."""
        if component in self.configs:
            return self.configs[component]
        if self.root is None:
            return {}
        path = self.root / component / filename
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GigadiffError(f"model {self.name!r}: {path} is not valid JSON ({e})") from None

    def scheduler_config(self) -> dict[str, Any]:
        return self.config("scheduler", "scheduler_config.json")


def object_source(pipe: Any, name: str = "") -> ModelSource:
    """A source for a diffusers pipeline the caller already loaded: its class and its components' configs."""
    configs = {}
    for component in getattr(pipe, "components", {}) or {}:
        config = getattr(getattr(pipe, component, None), "config", None)
        if config is None:
            continue
        configs[component] = (
            config.to_dict() if hasattr(config, "to_dict") else dict(config)
        )  # transformers or diffusers
    label = str(name or getattr(pipe, "name_or_path", "") or type(pipe).__name__)
    return ModelSource(label, "object", label, index={"_class_name": type(pipe).__name__}, configs=configs)


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo: str) -> Path | None:
    """The cached snapshot folder of `repo` (its main revision) that holds a model_index.json, if any."""
    folder = hub_cache() / f"models--{repo.replace('/', '--')}"
    ref = folder / "refs" / "main"
    candidates: list[Path] = []
    if ref.is_file():
        candidates.append(folder / "snapshots" / ref.read_text().strip())
    if (folder / "snapshots").is_dir():
        candidates += sorted((folder / "snapshots").iterdir())
    return next((c for c in candidates if (c / "model_index.json").is_file()), None)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def require_present(source: ModelSource) -> None:
    """Raise the missing-model error of a preset that could not be found."""
    if source.missing:
        raise GigadiffError(source.missing, "model")


def missing_model_message(model: str, repo: str, cause: str) -> str:
    shown = model if model == repo else f"{model} ({repo})"
    return (
        f"cannot load model {shown}: it is not in the local Hugging Face cache and could not be downloaded "
        f"({cause}). Download it on a connected machine with `hf download {repo}` and copy the cache "
        "(HF_HOME), or pass {model} /path/to/a/diffusers/folder or a .safetensors checkpoint"
    )


def fetch_configs(repo: str, model: str) -> Path:
    """Download only a hub model's model_index.json and component configs (not its weights), so that the
    checks before a run can read them; the weights follow when the model loads."""
    try:
        from huggingface_hub import hf_hub_download

        index_path = Path(hf_hub_download(repo, "model_index.json"))
        index = json.loads(index_path.read_text())
        for component, spec in index.items():
            if component.startswith("_") or not isinstance(spec, list):
                continue
            name = "scheduler_config.json" if component == "scheduler" else "config.json"
            with contextlib.suppress(Exception):  # tokenizers and processors have other files, not needed here
                hf_hub_download(repo, f"{component}/{name}")
        return index_path.parent
    except Exception as e:
        raise GigadiffError(missing_model_message(model, repo, f"{type(e).__name__}: {str(e)[:200]}"),
                            "model") from None  # fmt: skip


def read_index(root: Path, model: str) -> dict[str, Any]:
    path = root / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GigadiffError(f"model {model!r}: {path} is not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise GigadiffError(f"model {model!r}: {path} does not describe a diffusers pipeline")
    return index


def safetensors_keys(path: Path) -> tuple[str, ...]:
    """The tensor names of a .safetensors file, from its header alone; a damaged file is a clear error."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
            if not 0 < length <= min(MAX_HEADER, path.stat().st_size - 8):
                raise ValueError("bad header length")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise GigadiffError(
            f"checkpoint {path} is not a readable .safetensors file (damaged or not safetensors: {e})", "model"
        ) from None
    return tuple(k for k in header if k != "__metadata__")


def locate(model: str, builtins: tuple[str, ...], presets: dict[str, str]) -> ModelSource:
    """Find `model`: a built-in name, a preset (name -> hub id), a single file, a folder or a hub id."""
    if model in builtins:
        return ModelSource(model, "builtin", model)
    if model in presets:
        return _hub(model, presets[model], "preset")
    path = Path(model).expanduser()
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise GigadiffError(f"checkpoint file {path} does not exist", "model")
        keys = safetensors_keys(path) if path.suffix == ".safetensors" else ()
        return ModelSource(model, "file", str(path), file_keys=keys)
    if model.startswith((".", "/", "~")) or path.exists():
        if not path.exists():
            raise GigadiffError(f"model folder {path} does not exist", "model")
        if not (path / "model_index.json").is_file():
            raise GigadiffError(f"{path} is not a diffusers model folder (it has no model_index.json)", "model")
        return ModelSource(model, "folder", str(path), path, read_index(path, model))
    if model.count("/") != 1 or not all(model.split("/")):
        known = ", ".join([*builtins, *sorted(presets)])
        raise GigadiffError(
            f"unknown model {model!r}: not a preset ({known}), not a local folder or checkpoint, "
            "and not a hub id of the form owner/name",
            "model",
        )
    return _hub(model, model, "hub")


def _hub(model: str, repo: str, kind: SourceKind) -> ModelSource:
    root = cached_snapshot(repo)
    if root is None:
        if offline():
            message = missing_model_message(model, repo, "HF_HUB_OFFLINE is set")
            if kind == "preset":
                return ModelSource(model, kind, repo, preset=model, missing=message)
            raise GigadiffError(message, "model")
        root = fetch_configs(repo, model)
    return ModelSource(model, kind, repo, root, read_index(root, model), preset=model if kind == "preset" else None)
