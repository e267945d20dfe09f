"""Super-resolution networks before the repaint: `gigadiff upscale photo.png --upscaler MODEL.pth`.

The file is loaded by spandrel, which recognises the architecture from the weights (ESRGAN, Real-ESRGAN, SwinIR,
HAT, DAT, ...). The network runs on tiles of the input image with an overlap (any size fits in the device's
memory: one tile's activations at a time), each tile's output weighted by ramps over the overlap that sum to one
with its neighbours', so no seam shows; the result is resized to the run's canvas (Lanczos), and becomes the
image the diffusion repaint starts from, in place of a plain resize.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gigadiff.errors import GigadiffError, first_line

if TYPE_CHECKING:
    import torch

UPSCALER_FILES = (".pth", ".pt", ".safetensors", ".ckpt")
TILE_PX = 256
"""Input pixels a side of one tile (an ESRGAN's activations at 4x: about 0.6 GB per tile in fp32)."""
OVERLAP_PX = 16
"""Input pixels two neighbouring tiles share (a few times the network's receptive reach at the input)."""


def check_upscaler_file(path: str) -> None:
    file = Path(path).expanduser()
    if file.suffix not in UPSCALER_FILES:
        raise GigadiffError(f"{{upscaler}} {path!r} must be a {'/'.join(UPSCALER_FILES)} file", "upscaler")
    if not file.is_file():
        raise GigadiffError(f"{{upscaler}} file {file} does not exist", "upscaler")


def load_upscaler(path: str, device: Any) -> Any:
    """The network in `path` as spandrel's image-to-image descriptor, on `device`, in eval mode."""
    try:
        import spandrel
    except Exception as e:  # not installed, or its torchvision does not match the installed torch
        raise GigadiffError(f"{{upscaler}} needs spandrel and a torchvision that matches your torch ({type(e).__name__}"
                            f": {str(e)[:120]}); install them: pip install spandrel torchvision==<the version "
                            "matching your torch>", "upscaler") from e  # fmt: skip

    try:
        descriptor = spandrel.ModelLoader(device=device).load_from_file(str(Path(path).expanduser()))
    except Exception as e:
        first = first_line(e, 200)
        raise GigadiffError(f"{{upscaler}} {Path(path).name} is not a network spandrel knows: {first}",
                            "upscaler") from e  # fmt: skip
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.input_channels != 3:
        raise GigadiffError(f"{{upscaler}} {Path(path).name} is not an RGB image-to-image network", "upscaler")
    return descriptor.eval()


def _weights(length: int, overlap: int, first: bool, last: bool) -> torch.Tensor:
    """A tile's output weights along one axis: over each overlap with a neighbour, nothing for its outer quarter
    (the pixels the zero padding at the tile's edge reaches), a linear ramp over its middle half, full weight for
    its inner quarter; a neighbour's mirrored ramp over the same pixels makes them sum to one."""
    import torch

    w = torch.ones(length)
    margin = overlap // 4
    ramp = torch.zeros(overlap)
    ramp[margin : overlap - margin] = (torch.arange(overlap - 2 * margin) + 0.5) / (overlap - 2 * margin)
    ramp[overlap - margin :] = 1
    if not first:
        w[:overlap] = ramp
    if not last:
        w[length - overlap :] = ramp.flip(0)
    return w


def upscale_tiled(model: Any, image: torch.Tensor, tile: int = TILE_PX, overlap: int = OVERLAP_PX) -> torch.Tensor:
    """`image` [1, 3, H, W] in [0, 1] through `model` tile by tile: [1, 3, H*s, W*s] in [0, 1] on the host."""
    import torch

    from gigadiff.geometry import axis_starts

    _, _, height, width = image.shape
    s = model.scale
    out = torch.zeros(1, 3, height * s, width * s)
    total = torch.zeros(1, 1, height * s, width * s)
    rows = axis_starts(height, min(tile, height), overlap)
    cols = axis_starts(width, min(tile, width), overlap)
    device = next(model.model.parameters()).device
    for y in rows:
        for x in cols:
            h, w = min(tile, height - y), min(tile, width - x)
            with torch.no_grad():
                piece = model(image[:, :, y : y + h, x : x + w].to(device)).float().cpu().clamp(0, 1)
            wy = _weights(h * s, overlap * s, y == rows[0], y == rows[-1])
            wx = _weights(w * s, overlap * s, x == cols[0], x == cols[-1])
            weight = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y * s : (y + h) * s, x * s : (x + w) * s] += piece * weight
            total[:, :, y * s : (y + h) * s, x * s : (x + w) * s] += weight
    return out / total


def upscaled_init(image_path: str, upscaler: str, width: int, height: int, device: Any) -> torch.Tensor:
    """The init image through the upscaler, then resized to the canvas: [1, 3, height, width] in [-1, 1]."""
    from PIL import Image

    from gigadiff.io.images import open_image, pil_to_tensor, tensor_to_pil

    model = load_upscaler(upscaler, device)
    with open_image(image_path, "init image") as im:
        rgb = pil_to_tensor(im.convert("RGB"))  # [-1, 1]
    big = upscale_tiled(model, (rgb + 1) / 2)
    picture = tensor_to_pil(big * 2 - 1)[0]
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    return pil_to_tensor(picture)
