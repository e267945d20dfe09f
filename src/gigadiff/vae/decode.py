"""Decoding latents through an AutoencoderKL-family VAE with gigadiff's tiled VAE (see tiled.py)."""

from __future__ import annotations

from typing import Any

import torch

from gigadiff.vae.engine import TileSink
from gigadiff.vae.tiled import TiledVAE, VaeTiling, unscale_latents

__all__ = ["decode_latents", "stream_decode", "unscale_latents"]


def decode_latents(vae: Any, latents: torch.Tensor, tiling: VaeTiling | None = None) -> torch.Tensor:
    """Latents [B, C, h, w] -> images [B, 3, h*f, w*f] in [-1, 1] (float32, on the CPU)."""
    image = TiledVAE(vae, tiling).decode(latents)
    assert image is not None
    return image


def stream_decode(vae: Any, latents: torch.Tensor, sink: TileSink, tiling: VaeTiling | None = None) -> None:
    """Decode tile by tile into `sink` (row-major tiles in [-1, 1]); the image never exists whole."""
    TiledVAE(vae, tiling).decode(latents, sink)
