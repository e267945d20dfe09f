"""Checkpoints of a running generation, and resuming from them.

A checkpoint holds everything the loop needs to continue as if it had never stopped: the latent canvas, the
progressive-coherence stage and the number of its finished steps, the stage's reference (the enlarged earlier
stage it is pulled toward), the scheduler's state (multistep history included), the generator's RNG state (for
stochastic schedulers and re-noising), the model's fingerprint, and the record of the
whole resolved run request (model, outputs, VAE settings, ...), from which `gigadiff resume` rebuilds the run.
The shifted tile grids need no state: they are a function of (seed, step).

Format: one safetensors file (tensors, no pickle: opening a checkpoint cannot run code) with a JSON header.
Written to a temporary file and renamed into place, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigadiff.errors import GigadiffError
from gigadiff.io.files import publish

FORMAT = "gigadiff-checkpoint"
VERSION = 3
READS = ("2", "3")
"""Versions this gigadiff resumes (2 also held a copy of the settings, which are derived from the record)."""
_SKIP = {"config", "_internal_dict"}
_SCALARS = (int, float, bool, str, type(None))
_ARRAYS = (torch.Tensor, np.ndarray)


@dataclass(frozen=True)
class Checkpoint:
    fingerprint: str
    step: int
    """Timesteps already taken in `stage`; the run continues with timestep index `step`."""
    latents: torch.Tensor
    scheduler_state: dict[str, Any]
    generator_state: torch.Tensor
    record: dict[str, Any] = field(default_factory=dict)
    """The resolved run request (gigadiff.runs), so `gigadiff resume` needs only the file: the settings of the
    run are derived from it again."""
    stage: int = 0
    """Progressive coherence: the stage the run was in (0 for every other run)."""
    reference: torch.Tensor | None = None
    """Progressive coherence: that stage's reference (the earlier stage, enlarged and encoded)."""
    noise: torch.Tensor | None = None
    """Progressive coherence: the noise that stage draws its reference toward (drawn once at its start)."""

    @property
    def model(self) -> str:
        return str(self.record.get("model", ""))


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """The scheduler's mutable state: tensors, arrays, scalars, and lists of those (e.g. solver history)."""
    state: dict[str, Any] = {}
    for name, value in vars(scheduler).items():
        if name in _SKIP:
            continue
        if isinstance(value, _ARRAYS + _SCALARS):
            state[name] = value
        elif isinstance(value, list | tuple) and all(isinstance(v, (torch.Tensor, *_SCALARS)) for v in value):
            state[name] = list(value)
        else:
            raise GigadiffError(f"cannot checkpoint scheduler {type(scheduler).__name__}: field {name!r} is a "
                                f"{type(value).__name__}")  # fmt: skip
    return state


def restore_scheduler(scheduler: Any, state: dict[str, Any]) -> None:
    device = scheduler.timesteps.device if isinstance(getattr(scheduler, "timesteps", None), torch.Tensor) else None
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and device is not None:
            value = value.to(device)
        elif isinstance(value, list):
            value = [v.to(device) if isinstance(v, torch.Tensor) and device is not None else v for v in value]
        setattr(scheduler, name, value)


def _split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors for the safetensors body; a JSON description of everything else (and where tensors go)."""
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, Any] = {}

    def put(key: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().clone()  # clone: schedulers share storage between fields
            return {"tensor": key}
        if isinstance(value, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
            return {"ndarray": key}
        return {"value": value}

    for name, value in state.items():
        if isinstance(value, list):
            described[name] = {"list": [put(f"scheduler.{name}.{i}", v) for i, v in enumerate(value)]}
        else:
            described[name] = put(f"scheduler.{name}", value)
    return tensors, described


def _join(described: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    def get(entry: dict[str, Any]) -> Any:
        if "tensor" in entry:
            return tensors[entry["tensor"]]
        if "ndarray" in entry:
            return tensors[entry["ndarray"]].numpy()
        return entry["value"]

    return {name: [get(e) for e in d["list"]] if "list" in d else get(d) for name, d in described.items()}


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    from safetensors.torch import save_file

    tensors, described = _split(ckpt.scheduler_state)
    tensors["latents"] = ckpt.latents.detach().to("cpu", torch.float32).contiguous()
    tensors["generator_state"] = ckpt.generator_state.cpu().contiguous()
    for name in ("reference", "noise"):
        value = getattr(ckpt, name)
        if value is not None:
            tensors[name] = value.detach().to("cpu", torch.float32).contiguous()
    header = {
        "format": FORMAT,
        "version": str(VERSION),
        "fingerprint": ckpt.fingerprint,
        "stage": str(ckpt.stage),
        "step": str(ckpt.step),
        "scheduler": json.dumps(described),
        "record": json.dumps(ckpt.record),
    }
    publish(path, lambda tmp: save_file(tensors, str(tmp), metadata=header), overwrite=True)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint, refusing anything that is not a complete gigadiff checkpoint with a clear message."""
    from safetensors import safe_open

    if not path.is_file():
        raise GigadiffError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise GigadiffError(f"{path} is not a readable checkpoint (corrupt or not safetensors): {e}") from None
    if header.get("format") != FORMAT:
        raise GigadiffError(f"{path} is not a gigadiff checkpoint")
    if header.get("version") not in READS:
        raise GigadiffError(f"{path} is a version {header.get('version')} checkpoint; this gigadiff reads "
                            f"{' and '.join(READS)} "
                            "(finish it with the gigadiff that wrote it)")  # fmt: skip
    try:
        return Checkpoint(
            fingerprint=header["fingerprint"],
            step=int(header["step"]),
            latents=tensors["latents"],
            scheduler_state=_join(json.loads(header["scheduler"]), tensors),
            generator_state=tensors["generator_state"],
            record=json.loads(header["record"]),
            stage=int(header["stage"]),
            reference=tensors.get("reference"),
            noise=tensors.get("noise"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise GigadiffError(f"{path} is an incomplete or damaged gigadiff checkpoint ({e})") from None
