"""Image files: opening them with clear errors, and conversions between model-space tensors and PIL images.

Torch is imported only by the tensor conversions, so that a run's input checks (an init image's size, a mask)
answer before it is loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from gigadiff.errors import GigadiffError

if TYPE_CHECKING:
    import torch

Image.MAX_IMAGE_PIXELS = None  # init images and our own outputs are routinely beyond PIL's bomb guard


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3 or 1, H, W] in [-1, 1] -> 8-bit PIL images (RGB or L)."""
    import torch

    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] float32 in [-1, 1]."""
    import torch

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def data_url_bytes(url: object, what: str, *fields: str) -> bytes:
    """The bytes of an image given as a `data:image/<type>;base64,<data>` URL; a clear error naming `what` (a
    template that may name request `fields`) when it is not one or its data is not base64."""
    import base64
    import binascii

    header, _, data = url.partition(",") if isinstance(url, str) else ("", "", "")
    if not (header.startswith("data:image/") and header.endswith(";base64") and data):
        raise GigadiffError(f"{what} must be an image as a data:image/<type>;base64,<data> URL", *fields)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise GigadiffError(f"{what}: the data URL is not valid base64", *fields) from None


def require_file(path: Path, role: str, where: str = "") -> None:
    """A clear error when `path` (the `role` of the file, e.g. "init image") is not a file."""
    if path.is_dir():
        raise GigadiffError(f"{where}{role} {path} is a folder, not a file")
    if not path.is_file():
        raise GigadiffError(f"{where}{role} {path} does not exist")


@contextlib.contextmanager
def open_image(path: str | Path, role: str = "image", where: str = "") -> Iterator[Image.Image]:
    """Open an image file; a missing file or one PIL cannot read or decode (inside the block too) is a
    GigadiffError naming its role ("init image", "mask image") and, with `where`, what it belongs to."""
    path = Path(path)
    require_file(path, role, where)
    try:
        with Image.open(path) as im:
            yield im
    except OSError as e:
        raise GigadiffError(f"{where}cannot read {role} {path}: {e}") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header; a clear error if it is missing or unreadable."""
    with open_image(path, "init image") as im:
        return im.size


def load_resized(path: str | Path, width: int, height: int) -> torch.Tensor:
    """The image at `path` as RGB [1, 3, height, width] in [-1, 1], resized with Lanczos when its size differs."""
    with open_image(path, "init image") as im:
        rgb = im.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    return pil_to_tensor(rgb)
