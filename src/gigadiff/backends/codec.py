"""The VAE role, one component that every latent family shares: tiled decode, encode and streaming of a canvas.

A family's canvas is its *diffusion space*: what the denoiser reads and the noise is drawn in. It differs from
the VAE's own latents by a transform the family declares: SD's scaling factor, FLUX.1's shift and scale
(both handled by the tiled VAE from the VAE's config), FLUX.2's 2x2 patchify and BatchNorm statistics
(`to_vae` / `from_vae`). Everything else — exact and fast modes, memory plans, wrap-around, streaming to the
writers — is gigadiff's tiled VAE (gigadiff.vae), the same for every family.

The preview projection is the VAE's own linear response: decode a few constant canvases (zeros, then one
channel at a time at 1) of 8x8 canvas pixels and average their centres. That gives each latent channel's RGB
contribution for any family — real ones and the tiny test models alike — without tables of numbers, and the
canvas itself is never decoded for a preview.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gigadiff.lazy import torch
from gigadiff.vae.tiling import VaeTiling

if TYPE_CHECKING:
    import numpy as np
    import torch as torch_types

    from gigadiff.events import Listener
    from gigadiff.vae.plan import Engine
    from gigadiff.vae.tiles import TileSink

    Transform = Callable[[torch_types.Tensor], torch_types.Tensor]

PREVIEW_PROBE = 8
"""Side, in canvas pixels, of the constant canvases decoded once to fit the preview projection."""


def _identity(x: Any) -> Any:
    return x


class VaeCodec:
    """Tiled decode/encode of a family's canvas through its VAE, by the engine the family names
    (gigadiff.vae.engines: "groupnorm" for AutoencoderKLs, "halo" with its `networks` for the others)."""

    can_encode = True
    streams = True

    def __init__(self, vae: Any, device: Any, engine: str = "groupnorm", networks: Any = None,
                 to_vae: Transform = _identity, from_vae: Transform = _identity,
                 sample_posterior: bool = True, activate: Callable[[], None] = lambda: None):  # fmt: skip
        self.vae = vae
        self.activate = activate
        """Called before each VAE phase: brings the VAE onto the device where offloading keeps it off."""
        self.device = device
        self.engine = engine
        self.networks = networks
        """What the halo engine needs of the VAE: its (decoder, encoder) as gigadiff.vae.halo.Network."""
        self.to_vae = to_vae
        """Diffusion-space canvas -> the latents the tiled VAE decodes (before its own scaling)."""
        self.from_vae = from_vae
        self.sample_posterior = sample_posterior
        """Whether an encode with a generator draws from the posterior, as the family's img2img pipeline does (SD,
        FLUX.1, SD3, Qwen-Image, Z-Image), or takes its mean (FLUX.2's pipelines take the mode; SANA's DC-AE has no
        posterior)."""
        self._preview: tuple[torch_types.Tensor, torch_types.Tensor] | None = None

    def _tiled(self, tiling: VaeTiling, listener: Listener | None) -> Engine:
        from gigadiff.vae.engines import ENGINES

        self.activate()
        return ENGINES[self.engine](self.vae, tiling, listener, self.networks)

    def decode(
        self, latents: torch_types.Tensor, tiling: VaeTiling, listener: Listener | None = None
    ) -> torch_types.Tensor:
        image = self._tiled(tiling, listener).decode(self.to_vae(latents.float()))
        assert image is not None
        return image

    def stream_decode(self, latents: torch_types.Tensor, sink: TileSink, tiling: VaeTiling,
                      listener: Listener | None = None) -> None:  # fmt: skip
        self._tiled(tiling, listener).decode(self.to_vae(latents.float()), sink)

    def encode(self, images: torch_types.Tensor, generator: Any, tiling: VaeTiling,
               listener: Listener | None = None) -> torch_types.Tensor:  # fmt: skip
        sample = generator is not None and self.sample_posterior
        latents = self._tiled(tiling, listener).encode(images, sample, generator if sample else None)
        return self.from_vae(latents).to(self.device, torch.float32)

    def check(self, batch: int, height_px: int, width_px: int, tiling: VaeTiling) -> str:
        engine = self._tiled(tiling, None)
        return engine.plan(batch, height_px // engine.factor, width_px // engine.factor).mode

    def preview(self, latents: torch_types.Tensor, max_side: int) -> np.ndarray:
        weights, bias = self.projection(latents.shape[1])
        small = shrink(latents[:1].float().cpu(), max_side)
        rgb = torch.einsum("bchw,cd->bdhw", small, weights) + bias.view(1, 3, 1, 1)
        return to_rgb8(rgb)

    def projection(self, channels: int) -> tuple[torch_types.Tensor, torch_types.Tensor]:
        """Each canvas channel's RGB response [C, 3] and the RGB of a zero canvas [3] (computed once)."""
        if self._preview is None:
            n = PREVIEW_PROBE
            probes = torch.zeros(channels + 1, channels, n, n)
            for c in range(channels):
                probes[c + 1, c] = 1.0
            with torch.no_grad():
                rgb = torch.cat([self.decode(p[None], VaeTiling(mode="fast")) for p in probes])
            q = rgb.shape[-1] // 4
            centre = rgb[..., q:-q, q:-q].mean(dim=(2, 3))  # [C + 1, 3]; the borders see zero padding
            self._preview = (centre[1:] - centre[0]).float(), centre[0].float()
        return self._preview


def shrink(x: torch_types.Tensor, max_side: int) -> torch_types.Tensor:
    """Average-pool [B, C, H, W] by the smallest whole factor that brings both sides to at most `max_side`."""
    factor = max(1, -(-max(x.shape[-2:]) // max_side))
    return torch.nn.functional.avg_pool2d(x, factor, ceil_mode=True) if factor > 1 else x


def to_rgb8(rgb: torch_types.Tensor) -> np.ndarray:
    """[1, 3, h, w] in [-1, 1] -> [h, w, 3] uint8."""
    return ((rgb[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
