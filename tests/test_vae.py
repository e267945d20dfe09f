"""gigadiff's tiled VAE against the whole-image VAE, on a real photo (skimage) encoded with a tiny AutoencoderKL."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from gigadiff.errors import GigadiffError
from gigadiff.testing import tiny_vae
from gigadiff.vae.tiled import TiledVAE, VaeTiling, scale_latents, unscale_latents


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(4.0 / float(((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return tiny_vae().eval()


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return F.interpolate(img, size=(384, 512), mode="bilinear", antialias=True)


@pytest.fixture(scope="module")
def latents(vae, photo):
    with torch.no_grad():
        return scale_latents(vae, vae.encode(photo).latent_dist.mean)


def whole_decode(vae, z):
    with torch.no_grad():
        return vae.decode(unscale_latents(vae, z), return_dict=False)[0].clamp(-1, 1)


@pytest.mark.parametrize("memory_gb", [2.0, 0.0005])
def test_exact_decode_equals_the_whole_image_decode(vae, latents, memory_gb):
    """0.0005 GB forces 8-16 px tiles per layer and chunked attention; the result must not change."""
    tiled = TiledVAE(vae, VaeTiling(mode="exact", memory_gb=memory_gb))
    out = tiled.decode(latents)
    assert tiled.last_plan is not None and tiled.last_plan.mode == "exact"
    assert out.shape == (1, 3, 384, 512)
    assert (out - whole_decode(vae, latents)).abs().max() <= 1e-3


def test_exact_encode_equals_the_whole_encode_and_round_trips(vae, photo, latents):
    tiled = TiledVAE(vae, VaeTiling(mode="exact", memory_gb=0.0005))
    z = tiled.encode(photo)
    assert (z - latents).abs().max() <= 1e-3
    assert (tiled.decode(z) - whole_decode(vae, latents)).abs().max() <= 1e-3
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(tiled.encode(photo, sample=True, generator=g1), tiled.encode(photo, sample=True, generator=g2))


def test_fast_mode_error_is_bounded_and_smaller_than_diffusers_tiling(vae, latents, capsys, monkeypatch):
    import gigadiff.vae.tiled as tiled

    monkeypatch.setattr(tiled, "SAMPLE_ABOVE", 16)  # this small latent would otherwise be measured whole
    ref = whole_decode(vae, latents)
    sampled = TiledVAE(vae, VaeTiling(mode="fast", memory_gb=0.05, cell=16)).decode(latents)
    full_stats = TiledVAE(vae, VaeTiling(mode="fast", memory_gb=0.05, sample=1.0)).decode(latents)
    ours, ours_full = psnr(sampled, ref), psnr(full_stats, ref)
    tiling_vae = copy.deepcopy(vae)
    tiling_vae.enable_tiling()
    tiling_vae.tile_sample_min_size, tiling_vae.tile_latent_min_size = 128, 16
    theirs = psnr(whole_decode(tiling_vae, latents), ref)
    with capsys.disabled():
        print(f"\nfast-mode PSNR vs whole: sampled stats {ours:.1f} dB, full stats {ours_full:.1f} dB; "
              f"diffusers enable_tiling {theirs:.1f} dB")  # fmt: skip
    assert ours_full >= 40  # only the halo cut-off remains
    assert ours > theirs + 5


def test_wrap_mode_equals_a_circularly_padded_decode(vae, latents):
    circular = copy.deepcopy(vae)
    for m in circular.modules():
        if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0):
            m.padding_mode = "circular"
    out = TiledVAE(vae, VaeTiling(mode="exact", memory_gb=0.001, wrap=(True, True))).decode(latents)
    assert (out - whole_decode(circular, latents)).abs().max() <= 1e-3
    x_only = TiledVAE(vae, VaeTiling(mode="exact", wrap=(False, True))).decode(latents)
    assert (x_only - out).abs().max() > 1e-2  # top/bottom edges are not wrapped


def test_16_channel_vae_with_shift_factor(photo):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=16, norm_num_groups=4,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                        scaling_factor=0.3611).eval()  # fmt: skip
    tiled = TiledVAE(vae, VaeTiling(mode="exact", memory_gb=0.001))
    z = tiled.encode(photo[:, :, :64, :96])
    with torch.no_grad():
        ref_z = (vae.encode(photo[:, :, :64, :96]).latent_dist.mean - 0.1159) * 0.3611
    assert z.shape == (1, 16, 32, 48) and (z - ref_z).abs().max() <= 1e-3
    assert (tiled.decode(z) - whole_decode(vae, z)).abs().max() <= 1e-3


def test_errors_before_any_work(vae, latents):
    with pytest.raises(GigadiffError, match="--vae-mode must be one of"):
        VaeTiling(mode="quick")  # type: ignore[arg-type]
    with pytest.raises(GigadiffError, match="--vae-memory must be a positive"):
        VaeTiling(memory_gb=0)
    with pytest.raises(GigadiffError, match="too small for fast tiled VAE"):
        TiledVAE(vae, VaeTiling(mode="fast", memory_gb=1e-6)).decode(latents)
    with pytest.raises(GigadiffError, match="must be a multiple of 8"):
        TiledVAE(vae).encode(torch.zeros(1, 3, 60, 64))


def test_exact_mode_that_does_not_fit_in_ram_is_refused_or_spilled(vae, latents, monkeypatch, tmp_path):
    import gigadiff.vae.budget as budget

    monkeypatch.setattr(budget, "available_ram", lambda: 1024)
    with pytest.raises(GigadiffError, match=r"only 0\.0 GB of RAM is free: use --vae-mode fast, or give --vae-spill"):
        TiledVAE(vae, VaeTiling(mode="exact")).decode(latents)
    auto = TiledVAE(vae, VaeTiling(mode="auto", memory_gb=0.05))
    auto.decode(latents)
    assert auto.last_plan is not None and auto.last_plan.mode == "fast"
    spilled = TiledVAE(vae, VaeTiling(mode="exact", spill_dir=tmp_path)).decode(latents)
    assert (spilled - whole_decode(vae, latents)).abs().max() <= 1e-3
    assert not list(tmp_path.iterdir())  # memory-mapped buffers are removed when freed


def test_unscale_handles_shift_and_per_channel_statistics():
    class Cfg:
        scaling_factor, shift_factor, latents_mean, latents_std = 0.5, 0.1, None, None

    class Vae:
        config = Cfg()

    x = torch.ones(1, 2, 1, 1)
    assert torch.allclose(unscale_latents(Vae(), x), torch.full_like(x, 2.1))
    assert torch.allclose(scale_latents(Vae(), unscale_latents(Vae(), x)), x)
    Cfg.latents_mean, Cfg.latents_std = [1.0, 2.0], [2.0, 4.0]
    assert unscale_latents(Vae(), x).flatten().tolist() == [1.0 * 2 / 0.5 + 1, 1.0 * 4 / 0.5 + 2]
