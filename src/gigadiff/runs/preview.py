"""`--preview FILE`: a small PNG of the canvas, rewritten after every step, for any model family.

It is the codec's cheap projection of the latent channels to RGB (gigadiff.backends.codec; terrain: grey
heights), never a decode: at most PREVIEW_SIDE pixels a side, written through a temporary file and renamed, so
a viewer never reads half a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gigadiff.events import NullListener
from gigadiff.io.files import publish

PREVIEW_SIDE = 512


class PreviewWriter(NullListener):
    def __init__(self, codec: Any, path: Path, max_side: int = PREVIEW_SIDE):
        self.codec, self.path, self.max_side = codec, path, max_side

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        from PIL import Image

        image = Image.fromarray(self.codec.preview(latents, self.max_side))
        publish(self.path, lambda tmp: image.save(tmp, format="PNG"), overwrite=True)
