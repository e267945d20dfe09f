"""The model families gigadiff runs, and how a model is matched to one. Torch-free.

To add a family, write its module (see gigadiff.backends.family) and add one line to FAMILIES. Order matters
only for single-file checkpoints, whose tensor names are tried from the most specific family down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gigadiff.backends.family import Family, Preset
from gigadiff.backends.flux import Flux
from gigadiff.backends.flux2 import Flux2, Flux2Klein
from gigadiff.backends.loading import Loading
from gigadiff.backends.pixart import PixArtSigma
from gigadiff.backends.qwen_image import QwenImage
from gigadiff.backends.sana import Sana
from gigadiff.backends.sd import StableDiffusion
from gigadiff.backends.sd3 import StableDiffusion3
from gigadiff.backends.sdxl import StableDiffusionXL
from gigadiff.backends.source import ModelSource, locate, object_source, present
from gigadiff.backends.terrain import Terrain
from gigadiff.backends.z_image import ZImage
from gigadiff.errors import GigadiffError

if TYPE_CHECKING:
    from pathlib import Path

    from gigadiff.backends.base import Backend
    from gigadiff.facts import ModelInfo

FAMILIES: tuple[Family, ...] = (
    Terrain(),
    StableDiffusionXL(),
    Flux2Klein(),
    Flux2(),
    Flux(),
    ZImage(),
    StableDiffusion3(),
    QwenImage(),
    Sana(),
    PixArtSigma(),
    StableDiffusion(),
)


def presets() -> dict[str, tuple[Family, Preset]]:
    return {p.name: (family, p) for family in FAMILIES for p in family.presets}


def gguf_model(path: Path) -> str | None:
    """What `--model x.gguf` runs: the preset (or hub id) of the model the GGUF transformer belongs to (see
    gigadiff.backends.quantized.gguf_base_repo), None where the file does not say."""
    from gigadiff.backends.quantized import gguf_base_repo

    repo = gguf_base_repo(path)
    return next((name for name, (_, p) in presets().items() if p.repo == repo), repo)


def builtin_names() -> tuple[str, ...]:
    return tuple(name for family in FAMILIES for name in family.builtin)


def family_of(source: ModelSource) -> Family:
    """The family that runs `source`, or a clear error naming what it is and what gigadiff runs."""
    if source.preset is not None:
        return presets()[source.preset][0]
    for family in FAMILIES:
        if family.matches(source):
            return family
    known = ", ".join(p for f in FAMILIES for p in f.pipelines)
    if source.kind == "file":
        raise GigadiffError(
            f"checkpoint {source.location} is not one gigadiff can run: its tensor names match no model family "
            f"(single files of: {', '.join(f.name for f in FAMILIES if f.single_file_markers)})",
            "model",
        )
    what = source.pipeline_class or "not a diffusers pipeline"
    raise GigadiffError(
        f"model {source.name!r} is a {what}; gigadiff has no model family for it (it runs: {known})", "model"
    )


def find_model(model: str, paths: bool = True) -> tuple[ModelSource, Family, ModelInfo]:
    """Locate `model` and describe it from its config files: everything the checks need, without torch
    (`paths`: False where a name must not be read as a path on this machine; see `locate`)."""
    known = presets().values()
    source = locate(model, builtin_names(), {p.name: p.repo for _, p in known}, {p.repo for _, p in known if p.gated},
                    paths)  # fmt: skip
    family = family_of(source)
    return source, family, family.describe(source)


def load_backend(model: str | Any, device: str = "auto", dtype: str = "auto", **loading: Any) -> Backend:
    """A backend for `model`: a name or path (located, described, then loaded as `device`, `dtype` and `loading`,
    the other fields of gigadiff.backends.loading.Loading, say), or a loaded diffusers pipeline (used where it
    is, on its own device and dtype, offloaded or not)."""
    if not isinstance(model, str):
        source = object_source(model)
        family = family_of(source)
        return family.adapt(model, family.describe(source))
    source, family, info = find_model(model)
    if source.pending:
        source = present(source)
        info = family.describe(source)
    return family.load(source, info, Loading(device, dtype, **loading))


def described_backend(backend: Backend) -> tuple[ModelSource, Family, ModelInfo]:
    """What the run layer needs to resolve a request for a backend that is already loaded."""
    family = next((f for f in FAMILIES if f.name == backend.info.family), None)
    if family is None:
        raise GigadiffError(f"backend {backend.info.name!r} is of an unknown family {backend.info.family!r}")
    name = backend.info.name
    return ModelSource(name, "object", name), family, backend.info
