"""Conversions between model-space image tensors and PIL images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gigadiff.errors import GigadiffError

Image.MAX_IMAGE_PIXELS = None  # init images for gigapixel upscaling are routinely beyond PIL's bomb guard


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3 or 1, H, W] in [-1, 1] -> 8-bit PIL images (RGB or L)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] float32 in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header; a clear error if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise GigadiffError(f"init image {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise GigadiffError(f"cannot read init image {path}: {e}") from None


def load_resized(path: str | Path, width: int, height: int) -> torch.Tensor:
    """The image at `path` as RGB [1, 3, height, width] in [-1, 1], resized with Lanczos when its size differs."""
    image_size(path)
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    return pil_to_tensor(rgb)
