"""Conversions between model-space image tensors and PIL images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3 or 1, H, W] in [-1, 1] -> 8-bit PIL images (RGB or L)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] float32 in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()
