"""How a run's metadata (gigadiff.runs.metadata) is written into files: a JSON text, and the one-paragraph
"parameters" summary image viewers and web UIs show."""

from __future__ import annotations

import json
from typing import Any


def parameters_text(meta: dict[str, Any]) -> str:
    """A one-paragraph summary in the style image viewers and web UIs already show ("parameters" chunk)."""
    lines = [meta["prompt"]]
    if meta.get("negative"):
        lines.append(f"Negative prompt: {meta['negative']}")
    lines.append(
        f"Steps: {meta['steps']}, Sampler: {meta['scheduler']}, CFG scale: {meta['guidance']}, "
        f"Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, Model: {meta['model']}, "
        f"Tile: {meta['tile']}, Overlap: {meta['overlap']}, Weights: {meta['weights']}, "
        f"Shift: {meta['shift']}, Version: gigadiff {meta['gigadiff_version']}"
    )
    return "\n".join(lines)


def to_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, indent=2, sort_keys=True)
