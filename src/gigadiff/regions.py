"""Regional prompts: parts of the canvas painted toward their own prompt, fused with feathered masks.

A regions file is JSON:

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
when all four numbers lie in [0, 1]. A mask is a greyscale image (white: the region) resized to the canvas;
a relative mask path is taken from the regions file's folder. `feather` (image pixels, default 32) softens the
edges of boxes and masks that are inside the canvas.

At every step each region's prompt is predicted on the tiles its mask touches, and the predictions are fused
per pixel with weights: the region's feathered mask, and for the background prompt what the regions leave
(1 - the largest region weight, floored at BACKGROUND_FLOOR so every pixel keeps a defined prediction). A
region's own seed redraws the initial noise inside it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gigadiff.errors import GigadiffError
from gigadiff.io.images import open_image, require_file

DEFAULT_FEATHER_PX = 32
BACKGROUND_FLOOR = 1e-3
REGION_KEYS = {"box", "mask", "prompt", "negative_prompt", "guidance", "seed"}


@dataclass(frozen=True)
class RegionFile:
    regions: tuple[dict[str, Any], ...]
    """Normalised regions: prompt, negative_prompt, guidance (or None), seed (or None), box or mask (absolute)."""
    background: dict[str, str]
    feather: int


def load_region_file(path: Path) -> RegionFile:
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
    if isinstance(raw, list):
        raw = {"regions": raw}
    if not isinstance(raw, dict):
        raise GigadiffError(f'regions file {path} must hold an object with "regions", or a list of regions')
    unknown = set(raw) - {"regions", "background", "feather"}
    if unknown:
        raise GigadiffError(f"regions file {path}: unknown key(s) {', '.join(sorted(unknown))}")
    items = raw.get("regions")
    if not isinstance(items, list) or not items:
        raise GigadiffError(f'regions file {path} has no regions (a non-empty list under "regions")')
    feather = raw.get("feather", DEFAULT_FEATHER_PX)
    if not isinstance(feather, int | float) or feather < 0:
        raise GigadiffError(f"regions file {path}: feather must be a number of pixels >= 0, got {feather!r}")
    background = raw.get("background", {})
    if not isinstance(background, dict) or set(background) - {"prompt", "negative_prompt"}:
        raise GigadiffError(f"regions file {path}: background may only hold prompt and negative_prompt")
    regions = tuple(_region(item, i, path) for i, item in enumerate(items, 1))
    return RegionFile(regions, {k: str(v) for k, v in background.items()}, int(feather))


def _region(item: Any, n: int, path: Path) -> dict[str, Any]:
    where = f"regions file {path}, region {n}"
    if not isinstance(item, dict):
        raise GigadiffError(f"{where}: a region must be an object with a prompt and a box or mask")
    unknown = set(item) - REGION_KEYS
    if unknown:
        raise GigadiffError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(REGION_KEYS))}"
        )
    if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        raise GigadiffError(f'{where}: needs a non-empty "prompt"')
    if ("box" in item) == ("mask" in item):
        raise GigadiffError(f'{where}: give exactly one of "box" and "mask"')
    out: dict[str, Any] = {
        "prompt": item["prompt"],
        "negative_prompt": str(item.get("negative_prompt", "")),
        "guidance": item.get("guidance"),
        "seed": item.get("seed"),
    }
    if out["guidance"] is not None and (not isinstance(out["guidance"], int | float) or out["guidance"] < 0):
        raise GigadiffError(f"{where}: guidance must be a number >= 0, got {out['guidance']!r}")
    if out["seed"] is not None and (not isinstance(out["seed"], int) or not 0 <= out["seed"] < 2**64):
        raise GigadiffError(f"{where}: seed must be an integer in [0, 2**64), got {out['seed']!r}")
    if "box" in item:
        box = item["box"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
            raise GigadiffError(f"{where}: box must be [left, top, right, bottom], got {box!r}")
        out["box"] = [float(v) for v in box]
    else:
        mask = Path(item["mask"])
        mask = mask if mask.is_absolute() else path.parent / mask
        require_file(mask, "mask image", f"{where}: ")
        out["mask"] = str(mask)
    return out


def box_pixels(box: list[float], width: int, height: int, where: str) -> tuple[int, int, int, int]:
    """[left, top, right, bottom] in pixels (fractions scaled), checked against a width x height canvas."""
    fraction = all(0 <= v <= 1 for v in box)
    left, top, right, bottom = (box[0] * width, box[1] * height, box[2] * width, box[3] * height) if fraction else box
    if not (right > left and bottom > top):
        raise GigadiffError(f"{where}: box {box} is empty (right must exceed left, bottom must exceed top)")
    if left < 0 or top < 0 or right > width or bottom > height:
        raise GigadiffError(f"{where}: box {box} reaches outside the {width}x{height} canvas")
    return round(left), round(top), round(right), round(bottom)


def check_regions(regions: tuple[dict[str, Any], ...], width: int, height: int) -> None:
    """Checks that need the canvas size: boxes inside it, masks readable and not empty."""
    for i, region in enumerate(regions, 1):
        where = f"region {i} ({region['prompt']!r})"
        if "box" in region:
            box_pixels(region["box"], width, height, where)
        else:
            mask = _mask_values(region["mask"], width, height, where)
            if not (mask > 0.5).any():
                raise GigadiffError(f"{where}: mask {region['mask']} is empty (no white pixel at the canvas size)")


def _mask_values(path: str, width: int, height: int, where: str) -> np.ndarray:
    with open_image(path, "mask image", f"{where}: ") as im:
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


def region_weight(region: dict[str, Any], width: int, height: int, factor: int, feather_px: int) -> torch.Tensor:
    """A region's feathered weight in [0, 1] on the latent canvas [height/factor, width/factor]."""
    h, w = height // factor, width // factor
    feather = feather_px / factor
    where = f"region ({region['prompt']!r})"
    if "box" in region:
        left, top, right, bottom = (v / factor for v in box_pixels(region["box"], width, height, where))
        weight = np.outer(_ramp(h, math.floor(top), math.ceil(bottom), feather),
                          _ramp(w, math.floor(left), math.ceil(right), feather))  # fmt: skip
    else:
        mask = _mask_values(region["mask"], w, h, where).astype(np.float64)
        weight = mask
        k = 2 * int(feather // 2) + 1
        if k > 1 and min(h, w) > k:
            from gigadiff.metrics import box_mean

            weight = mask * box_mean(mask, k)  # soft inside the edge, still zero outside
    return torch.from_numpy(weight.astype(np.float32))


def background_weight(weights: list[torch.Tensor]) -> torch.Tensor:
    """What the regions leave to the background prompt: 1 - the largest region weight, floored above zero."""
    return (1 - torch.stack(weights).amax(dim=0)).clamp_min(BACKGROUND_FLOOR)
