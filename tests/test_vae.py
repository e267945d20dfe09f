"""The interim VAE decode: the model's own VAE, diffusers tiling switched on for big canvases."""

from __future__ import annotations

import torch

import gigadiff.vae.decode as vae_decode
from gigadiff.vae.decode import decode_latents, unscale_latents


def test_decode_matches_the_pipelines_own_decode(sd_pipe):
    latents = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    ours = decode_latents(sd_pipe.vae, latents)
    with torch.no_grad():
        ref = sd_pipe.vae.decode(latents / sd_pipe.vae.config.scaling_factor, return_dict=False)[0].clamp(-1, 1)
    assert ours.shape == (1, 3, 128, 192)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_tiling_is_used_above_the_threshold_and_restored(sd_pipe, monkeypatch):
    seen = []
    original = sd_pipe.vae.decode

    def spy(*args, **kwargs):
        seen.append(bool(sd_pipe.vae.use_tiling))
        return original(*args, **kwargs)

    monkeypatch.setattr(sd_pipe.vae, "decode", spy)
    monkeypatch.setattr(vae_decode, "TILING_ABOVE_PX", 64 * 64)
    decode_latents(sd_pipe.vae, torch.randn(1, 4, 16, 16))
    decode_latents(sd_pipe.vae, torch.randn(1, 4, 4, 4))
    assert seen == [True, False] and not sd_pipe.vae.use_tiling


def test_unscale_handles_shift_and_per_channel_statistics():
    class Cfg:
        scaling_factor, shift_factor, latents_mean, latents_std = 0.5, 0.1, None, None

    class Vae:
        config = Cfg()

    x = torch.ones(1, 2, 1, 1)
    assert torch.allclose(unscale_latents(Vae(), x), torch.full_like(x, 2.1))
    Cfg.latents_mean, Cfg.latents_std = [1.0, 2.0], [2.0, 4.0]
    assert unscale_latents(Vae(), x).flatten().tolist() == [1.0 * 2 / 0.5 + 1, 1.0 * 4 / 0.5 + 2]
