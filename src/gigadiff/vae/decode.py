"""Decoding latents through an AutoencoderKL-family VAE.

Interim implementation: the whole canvas goes through the model's own VAE, with diffusers' tiling switched on
above `TILING_ABOVE_PX` pixels so large canvases fit in memory. Known limitation (replaced by gigadiff's own
tiled VAE): diffusers' tiles each use their own GroupNorm statistics, which can show as faint tone shifts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

TILING_ABOVE_PX = 2048 * 2048


def unscale_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Undo the diffusion-space normalisation (scaling factor, shift, per-channel mean/std) of a VAE latent."""
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean_t = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(shape)
        std_t = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(shape)
        return latents * std_t / cfg.scaling_factor + mean_t
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return latents / cfg.scaling_factor + shift


@contextlib.contextmanager
def _vae_tiling(vae: Any, enabled: bool) -> Iterator[None]:
    was = bool(getattr(vae, "use_tiling", False))
    if enabled and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    try:
        yield
    finally:
        if enabled and not was and hasattr(vae, "disable_tiling"):
            vae.disable_tiling()


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> images [B, 3, h*f, w*f] in [-1, 1] (float32, on the CPU)."""
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
        dtype = torch.float32
    try:
        z = unscale_latents(vae, latents.to(device, torch.float32)).to(dtype)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        big = z.shape[-2] * z.shape[-1] * factor * factor > TILING_ABOVE_PX
        with _vae_tiling(vae, big):
            image = vae.decode(z, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return image.float().clamp(-1, 1).cpu()
