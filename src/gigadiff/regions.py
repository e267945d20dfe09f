"""Regional prompts: parts of the canvas painted toward their own prompt, fused with feathered masks.

Regions come as JSON, from a file (`--regions regions.json`) or inline (the Python API and the service):

    {
      "background": {"prompt": "a meadow at dusk", "negative_prompt": "people"},
      "feather": 48,
      "regions": [
        {"box": [0.05, 0.4, 0.45, 0.95], "prompt": "a red barn", "guidance": 9, "seed": 5},
        {"box": [900, 100, 1400, 500], "prompt": "a full moon"},
        {"mask": "lake.png", "prompt": "a still lake", "negative_prompt": "boats"}
      ]
    }

(or just the list of regions). A box is [left, top, right, bottom], in pixels, or in fractions of the canvas
when all four numbers lie in [0, 1]. A mask is a greyscale image (white: the region) resized to the canvas:
a file (a relative path is taken from the regions file's folder) or, where files cannot be named (the
service), a `data:image/png;base64,...` URL. `feather` (image pixels, default 32) softens the edges of boxes
and masks that are inside the canvas.

At every step each region's prompt is predicted on the tiles its mask touches, and the predictions are fused
per pixel with weights: the region's feathered mask, and for the background prompt what the regions leave
(1 - the largest region weight, floored at BACKGROUND_FLOOR so every pixel keeps a defined prediction). A
region's own seed redraws the initial noise inside it.

Parsing and checking need no torch; the weights are computed when a run starts.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gigadiff.errors import GigadiffError
from gigadiff.io.images import data_url_bytes, open_image, require_file
from gigadiff.options import OPTIONS

if TYPE_CHECKING:
    import torch

DEFAULT_FEATHER_PX = 32
BACKGROUND_FLOOR = 1e-3
REGION_KEYS = {"box", "mask", "prompt", "negative_prompt", "guidance", "seed"}
DATA_URL = "data:image/"


@dataclass(frozen=True)
class Region:
    """One regional prompt: where (a box or a mask) and what (prompt, negative prompt, guidance, seed)."""

    prompt: str
    negative_prompt: str = ""
    guidance: float | None = None
    """None: the run's guidance."""
    seed: int | None = None
    """None: the run's noise; a seed redraws the initial noise where this region dominates."""
    box: tuple[float, float, float, float] | None = None
    """[left, top, right, bottom] in pixels, or fractions of the canvas when all four lie in [0, 1]."""
    mask: str | None = None
    """A greyscale image file (absolute path) or a data: URL."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Region:
        """A region recorded by `dataclasses.asdict` (metadata, checkpoints)."""
        box = d.get("box")
        return cls(**{**d, "box": tuple(box) if box is not None else None})


@dataclass(frozen=True)
class RegionSet:
    regions: tuple[Region, ...]
    background: dict[str, str]
    """The background's prompt and negative prompt, used when the run gives none."""
    feather: int


MAX_REGIONS = 64
MAX_REGION_PROMPT = OPTIONS["prompt"].longest
"""Characters of a region's prompt or negative prompt: as for the request's own prompt."""


def load_region_file(path: Path) -> RegionSet:
    """Read and check a regions file (everything that needs no canvas size); clear errors for bad content."""
    if not path.is_file():
        raise GigadiffError(f"regions file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GigadiffError(
            f"regions file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from None
    except UnicodeDecodeError:
        raise GigadiffError(f"regions file {path} is not a JSON text file") from None
    return parse_regions(raw, f"regions file {path}", folder=path.parent)


def parse_regions(raw: Any, where: str = "regions", folder: Path | None = None) -> RegionSet:
    """Check regions given as JSON data. `folder`: where relative mask paths are; None allows no mask files
    (only data: URLs), for callers that may not name files on this machine."""
    if isinstance(raw, list):
        raw = {"regions": raw}
    if not isinstance(raw, dict):
        raise GigadiffError(f'{where} must hold an object with "regions", or a list of regions')
    unknown = set(raw) - {"regions", "background", "feather"}
    if unknown:
        raise GigadiffError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    items = raw.get("regions")
    if not isinstance(items, list) or not items:
        raise GigadiffError(f'{where} has no regions (a non-empty list under "regions")')
    if len(items) > MAX_REGIONS:
        raise GigadiffError(f"{where}: {len(items)} regions; at most {MAX_REGIONS} are taken (each is its own "
                            "model pass on the tiles it touches)")  # fmt: skip
    feather = raw.get("feather", DEFAULT_FEATHER_PX)
    if isinstance(feather, bool) or not isinstance(feather, int | float) or feather < 0:
        raise GigadiffError(f"{where}: feather must be a number of pixels >= 0, got {feather!r}")
    background = raw.get("background", {})
    if not isinstance(background, dict) or set(background) - {"prompt", "negative_prompt"}:
        raise GigadiffError(f"{where}: background may only hold prompt and negative_prompt")
    regions = tuple(_region(item, f"{where}, region {i}", folder) for i, item in enumerate(items, 1))
    return RegionSet(regions, {k: str(v) for k, v in background.items()}, int(feather))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _region(item: Any, where: str, folder: Path | None) -> Region:
    if not isinstance(item, dict):
        raise GigadiffError(f"{where}: a region must be an object with a prompt and a box or mask")
    unknown = set(item) - REGION_KEYS
    if unknown:
        raise GigadiffError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(REGION_KEYS))}"
        )
    if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        raise GigadiffError(f'{where}: needs a non-empty "prompt"')
    for key in ("prompt", "negative_prompt"):
        if isinstance(item.get(key), str) and len(item[key]) > MAX_REGION_PROMPT:
            raise GigadiffError(f"{where}: its {key} is {len(item[key])} characters; at most {MAX_REGION_PROMPT}")
    if ("box" in item) == ("mask" in item):
        raise GigadiffError(f'{where}: give exactly one of "box" and "mask"')
    guidance, seed = item.get("guidance"), item.get("seed")
    if guidance is not None and (not _number(guidance) or guidance < 0):
        raise GigadiffError(f"{where}: guidance must be a number >= 0, got {guidance!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise GigadiffError(f"{where}: seed must be an integer in [0, 2**64), got {seed!r}")
    box: tuple[float, float, float, float] | None = None
    mask: str | None = None
    if "box" in item:
        raw_box = item["box"]
        if not (isinstance(raw_box, list) and len(raw_box) == 4 and all(_number(v) for v in raw_box)):
            raise GigadiffError(f"{where}: box must be [left, top, right, bottom], got {raw_box!r}")
        left, top, right, bottom = (float(v) for v in raw_box)
        box = (left, top, right, bottom)
    else:
        mask = _mask_source(item["mask"], where, folder)
    return Region(str(item["prompt"]), str(item.get("negative_prompt", "")),
                  float(guidance) if guidance is not None else None, seed, box, mask)  # fmt: skip


def _mask_source(mask: Any, where: str, folder: Path | None) -> str:
    if not isinstance(mask, str) or not mask:
        raise GigadiffError(f"{where}: mask must be an image file name or a data:image/...;base64 URL")
    if mask.startswith(DATA_URL):
        data_url_bytes(mask, f"{where}: the mask")
        return mask
    if folder is None:
        raise GigadiffError(f"{where}: masks must be given as data:image/...;base64 URLs here, not as file names")
    path = Path(mask)
    path = path if path.is_absolute() else folder / path
    require_file(path, "mask image", f"{where}: ")
    return str(path)


def box_pixels(box: tuple[float, ...], width: int, height: int, where: str) -> tuple[int, int, int, int]:
    """[left, top, right, bottom] in pixels (fractions scaled), checked against a width x height canvas."""
    fraction = all(0 <= v <= 1 for v in box)
    left, top, right, bottom = (box[0] * width, box[1] * height, box[2] * width, box[3] * height) if fraction else box
    if not (right > left and bottom > top):
        raise GigadiffError(f"{where}: box {list(box)} is empty (right must exceed left, bottom must exceed top)")
    if left < 0 or top < 0 or right > width or bottom > height:
        raise GigadiffError(f"{where}: box {list(box)} reaches outside the {width}x{height} canvas")
    return round(left), round(top), round(right), round(bottom)


def _label(i: int, region: Region) -> str:
    return f"region {i} ({region.prompt!r})"


def check_regions(regions: tuple[Region, ...], width: int, height: int) -> None:
    """Checks that need the canvas size: boxes inside it, masks readable and not empty."""
    for i, region in enumerate(regions, 1):
        where = _label(i, region)
        if region.box is not None:
            box_pixels(region.box, width, height, where)
        else:
            assert region.mask is not None
            mask = _mask_values(region.mask, width, height, where)
            if not (mask > 0.5).any():
                shown = "the data URL" if region.mask.startswith(DATA_URL) else region.mask
                raise GigadiffError(f"{where}: mask {shown} is empty (no white pixel at the canvas size)")


def _mask_values(mask: str, width: int, height: int, where: str) -> np.ndarray:
    from PIL import Image

    if mask.startswith(DATA_URL):
        try:
            with Image.open(io.BytesIO(data_url_bytes(mask, f"{where}: the mask"))) as im:
                grey = im.convert("L").resize((width, height), Image.Resampling.BOX)
        except OSError as e:
            raise GigadiffError(f"{where}: cannot read the mask data URL as an image: {e}") from None
    else:
        with open_image(mask, "mask image", f"{where}: ") as im:
            grey = im.convert("L").resize((width, height), Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.float32) / 255.0


def _ramp(n: int, lo: int, hi: int, feather: float) -> np.ndarray:
    """1 on [lo, hi), rising over `feather` pixels inside an edge that is not the canvas edge; 0 outside."""
    i = np.arange(n, dtype=np.float64) + 0.5
    ramp = ((i >= lo) & (i < hi)).astype(np.float64)
    if feather > 0:
        if lo > 0:
            ramp *= np.clip((i - lo) / feather, 0, 1)
        if hi < n:
            ramp *= np.clip((hi - i) / feather, 0, 1)
    return ramp


def region_weight(region: Region, width: int, height: int, factor: int, feather_px: int) -> torch.Tensor:
    """A region's feathered weight in [0, 1] on the canvas [height/factor, width/factor]."""
    import torch

    h, w = height // factor, width // factor
    feather = feather_px / factor
    where = f"region ({region.prompt!r})"
    if region.box is not None:
        left, top, right, bottom = (v / factor for v in box_pixels(region.box, width, height, where))
        weight = np.outer(_ramp(h, math.floor(top), math.ceil(bottom), feather),
                          _ramp(w, math.floor(left), math.ceil(right), feather))  # fmt: skip
    else:
        assert region.mask is not None
        mask = _mask_values(region.mask, w, h, where).astype(np.float64)
        weight = mask
        k = 2 * int(feather // 2) + 1
        if k > 1 and min(h, w) > k:
            from gigadiff.metrics import box_mean

            weight = mask * box_mean(mask, k)  # soft inside the edge, still zero outside
    return torch.from_numpy(weight.astype(np.float32))


def background_weight(weights: list[torch.Tensor]) -> torch.Tensor:
    """What the regions leave to the background prompt: 1 - the largest region weight, floored above zero."""
    import torch

    return (1 - torch.stack(weights).amax(dim=0)).clamp_min(BACKGROUND_FLOOR)
