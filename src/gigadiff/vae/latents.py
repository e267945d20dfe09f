"""A VAE's latents and the family's diffusion space: the scaling, shift and per-channel statistics a VAE's config
declares, and drawing from an encoder's posterior."""

from __future__ import annotations

from typing import Any

import torch


def posterior_latents(moments: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    """An encoder's moments [B, 2C, h, w] (mean, logvar) -> the mean, or a sample drawn for the whole latent at
    once with `generator` (so tiling does not change it)."""
    mean, logvar = moments.chunk(2, dim=1)
    if not sample:
        return mean
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


def unscale_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Undo the diffusion-space normalisation (scaling factor, shift, per-channel mean/std) of a VAE latent."""
    mean, std, shift = _latent_norm(vae, latents)
    return latents * std / _scaling(vae) + mean + shift


def scale_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `unscale_latents`: VAE latents -> the space the denoiser works in."""
    mean, std, shift = _latent_norm(vae, latents)
    return (latents - mean - shift) * _scaling(vae) / std


def _scaling(vae: Any) -> float:
    """The VAE's scaling factor; 1 for VAEs whose family normalises latents otherwise (FLUX.2: BatchNorm).

    These are optional keys of a VAE's config (each VAE class declares the ones it has), read as such."""
    return float(vae.config.get("scaling_factor") or 1.0)


def _latent_norm(vae: Any, latents: torch.Tensor) -> tuple[Any, Any, float]:
    cfg = vae.config
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean_t = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(shape)
        std_t = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(shape)
        return mean_t, std_t, 0.0
    return 0.0, 1.0, float(cfg.get("shift_factor") or 0.0)
