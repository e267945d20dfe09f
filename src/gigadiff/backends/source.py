"""Where a model comes from, and its config files, found without loading torch or any weights.

`--model` accepts a built-in model (`terrain`), a preset alias (sd15, flux-dev, ...), a Hugging Face hub id, a
local diffusers folder, or a single-file checkpoint (.safetensors / .ckpt). This module finds the files and
reads what the checks before a run need: a folder's `model_index.json` and its components' config files (from
the folder, or from the local hub cache, whose layout is `models--owner--name/snapshots/<revision>/`), or a
single file's tensor names (from the safetensors header: 8 bytes of length, then JSON).

A preset's family is known from its name, so a preset that is not cached is described by its family's declared
defaults until the request's own checks have passed (`present` then fetches its config files): a bad size is
reported before any network access. A model that is not cached and cannot be fetched fails in a second or two,
never after the hub library's retries: the hub's host is tried once, with a short timeout, before any download.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import urllib.parse
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from gigadiff.errors import GigadiffError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
MAX_HEADER = 100 * 2**20
"""A safetensors header larger than this is taken as a damaged file (real headers are a few MB at most)."""

SourceKind = Literal["builtin", "preset", "hub", "folder", "file", "object"]
DEFAULT_ENDPOINT = "https://huggingface.co"
REACH_TIMEOUT = 2.0
"""Seconds to wait for the hub's host to accept a connection before calling it unreachable."""


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
    gated: bool = False
    """A hub model whose licence must be accepted on its hub page before it downloads."""
    pending: bool = False
    """A preset whose config files are neither cached nor fetched yet: its family's declared defaults describe it
    until `present` fetches them (after the request's own checks)."""

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


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "") or DEFAULT_ENDPOINT


def hub_cut_off() -> str:
    """Why the hub is not to be asked for files ("" if it may be): HF_HUB_OFFLINE, or a host that does not answer.
    Then only the local cache is read, at once, rather than after the hub library's retries."""
    return "HF_HUB_OFFLINE is set" if offline() else hub_unreachable()


def hub_unreachable(timeout: float = REACH_TIMEOUT) -> str:
    """Why the hub cannot be reached ("" when its host, or the proxy to it, accepts a TCP connection)."""
    endpoint = urllib.parse.urlsplit(hub_endpoint())
    host, port = endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or "", via.port or 80
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{hub_endpoint()} cannot be reached ({e.strerror or e or type(e).__name__})"
    return ""


class ModelUnavailable(GigadiffError):
    """A hub model that is not in the local cache and cannot be fetched now. The message's advice is the command
    line's; `for_server` gives a server's (whose clients cannot pass a path)."""

    def __init__(self, model: str, repo: str, cause: str, reason: str = "network", gated: bool = False) -> None:
        self.model, self.repo, self.cause, self.reason, self.gated = model, repo, cause, reason, gated
        super().__init__(f"{self.problem()}. {self.advice()}", "model")

    def problem(self, where: bool = True) -> str:
        """The problem; `where`: with the cache's path (not for a server's clients, who must not see its paths)."""
        shown = self.model if self.model == self.repo else f"{self.model} ({self.repo})"
        cache = f" ({hub_cache()})" if where else ""
        return f"cannot load model {shown}: it is not in the local Hugging Face cache{cache} and {self.cause}"

    def advice(self) -> str:
        if self.reason == "login":
            return ("Log in with `hf auth login` (or set HF_TOKEN) with an account that may read it; a gated model "
                    "such as FLUX.1-dev also needs its licence accepted on its hub page")  # fmt: skip
        return (f"Download it where there is network (`hf download {self.repo}`) and copy that cache here (set "
                "HF_HOME to it; HF_HUB_OFFLINE=1 then skips every network access), or pass {model} "
                "/path/to/a/diffusers/folder or a .safetensors checkpoint" + self.gate())  # fmt: skip

    def gate(self) -> str:
        if not self.gated:
            return ""
        return (". It is a gated model: accept its licence on its hub page and log in (`hf auth login`, or set "
                "HF_TOKEN) before downloading")  # fmt: skip

    def for_server(self, models: Path | None) -> GigadiffError:
        """The same problem with what a server's operator can do about it."""
        folder = (
            "; or put its diffusers folder in the server's models folder and name it by that folder's name"
            if models
            else "; or start the server with --models FOLDER holding its diffusers folder"
        )
        login = " after logging in there (`hf auth login`)" if self.reason == "login" or self.gated else ""
        return GigadiffError(f"{self.problem(where=False)}. The server cannot fetch it: download it into the "
                             f"server's cache with `hf download {self.repo}`{login}{folder}", "model")  # fmt: skip


def _hub_failure(e: Exception) -> tuple[str, str]:
    """(cause, reason) of a failed hub download, in words."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(e, GatedRepoError):
        return "it is a gated model this machine is not logged in for", "login"
    if isinstance(e, RepositoryNotFoundError):
        return "the hub has no such model (or it is private)", "login"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"could not be downloaded ({type(e).__name__}: {first})", "network"


def fetch_configs(repo: str, model: str, gated: bool = False) -> Path:
    """Download only a hub model's model_index.json and component configs (not its weights), so that the
    checks before a run can read them; the weights follow when the model loads."""
    cut_off = hub_cut_off()
    if cut_off:
        raise ModelUnavailable(model, repo, cut_off, gated=gated)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # no retry chatter: a failure is one line below
    try:
        index_path = Path(hf_hub_download(repo, "model_index.json"))
        index = json.loads(index_path.read_text())
        for component, spec in index.items():
            if component.startswith("_") or not isinstance(spec, list):
                continue
            name = "scheduler_config.json" if component == "scheduler" else "config.json"
            with contextlib.suppress(EntryNotFoundError):  # tokenizers and processors have other files
                hf_hub_download(repo, f"{component}/{name}")
        return index_path.parent
    except Exception as e:
        raise ModelUnavailable(model, repo, *_hub_failure(e), gated=gated) from None
    finally:
        hub_log.setLevel(level)


def present(source: ModelSource) -> ModelSource:
    """`source` with its config files at hand: a pending preset's fetched from the hub (or a clear error)."""
    if not source.pending:
        return source
    root = fetch_configs(source.location, source.name, source.gated)
    return replace(source, root=root, index=read_index(root, source.name), pending=False)


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
    return tuple(safetensors_header(path))


def safetensors_header(path: Path, role: str = "checkpoint", field: str = "model") -> dict[str, Any]:
    """A .safetensors file's header (name -> dtype, shape, offsets; its `__metadata__` left out), read alone; a
    damaged file is a clear error naming it as `role` and the option `field`."""
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
            f"{role} {path} is not a readable .safetensors file (damaged or not safetensors: {e})", field
        ) from None
    return {k: v for k, v in header.items() if k != "__metadata__"}


def locate(model: str, builtins: tuple[str, ...], presets: dict[str, str], gated: Collection[str] = (),
           paths: bool = True) -> ModelSource:  # fmt: skip
    """Find `model`: a built-in name, a preset (name -> hub id), a single file, a folder or a hub id (`gated`:
    the hub ids whose licence must be accepted; `paths`: False where a name must never be read as a path on this
    machine, e.g. a service's client naming a hub id that happens to be a folder where the server runs)."""
    if model in builtins:
        return ModelSource(model, "builtin", model)
    if model in presets:
        return _hub(model, presets[model], "preset", presets[model] in gated)
    path = Path(model).expanduser()
    if not paths:
        return _hub_id(model, builtins, presets, gated)
    if path.suffix == ".gguf":
        raise GigadiffError(f"{{model}} {model!r} is a GGUF file, which holds only the denoiser: pass it with "
                            "{transformer} beside the diffusers model it belongs to (e.g. --model flux-dev "
                            f"--transformer {path.name})", "model", "transformer")  # fmt: skip
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
    return _hub_id(model, builtins, presets, gated)


def _hub_id(model: str, builtins: tuple[str, ...], presets: dict[str, str], gated: Collection[str]) -> ModelSource:
    if model.count("/") != 1 or not all(model.split("/")) or ".." in model:
        known = ", ".join([*builtins, *sorted(presets)])
        raise GigadiffError(
            f"unknown model {model!r}: not a preset ({known}), not a local folder or checkpoint, "
            "and not a hub id of the form owner/name",
            "model",
        )
    return _hub(model, model, "hub", model in gated)


def _hub(model: str, repo: str, kind: SourceKind, gated: bool) -> ModelSource:
    preset = model if kind == "preset" else None
    root = cached_snapshot(repo)
    if root is None:
        if preset is not None:
            return ModelSource(model, kind, repo, preset=preset, gated=gated, pending=True)
        root = fetch_configs(repo, model, gated)
    return ModelSource(model, kind, repo, root, read_index(root, model), preset=preset, gated=gated)
