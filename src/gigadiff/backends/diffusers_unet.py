"""Backend for diffusers UNet pipelines: Stable Diffusion 1.x/2.x (epsilon and v-prediction) and SDXL.

Prompt encoding is the pipeline's own `encode_prompt` (so textual inversions, clip skip, LoRA scales and the
SDXL zero-negative convention behave as in diffusers). Classifier-free guidance runs inside `predict` with the
unconditional and conditional halves in one UNet batch, ordered [uncond..., cond...] as diffusers does.

SDXL micro-conditioning: each tile is presented as a crop of the full canvas, i.e. original_size = canvas size,
crops_coords_top_left = the tile's position, target_size = the tile size (all in image pixels). On a canvas
that fits in one tile this is exactly diffusers' default conditioning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gigadiff.backends.base import ModelInfo
from gigadiff.backends.presets import ModelPreset
from gigadiff.errors import GigadiffError
from gigadiff.geometry import Tile
from gigadiff.vae.decode import decode_latents, stream_decode
from gigadiff.vae.engine import TileSink
from gigadiff.vae.tiled import TiledVAE, VaeTiling, plan_decode


@dataclass(frozen=True)
class UNetConditioning:
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    pooled: torch.Tensor | None
    negative_pooled: torch.Tensor | None
    guidance: float
    guidance_rescale: float
    canvas_px: tuple[int, int]
    timestep_cond: torch.Tensor | None

    @property
    def uses_cfg(self) -> bool:
        return self.negative_embeds is not None


def is_sdxl(pipe: Any) -> bool:
    unet = getattr(pipe, "unet", None)
    return unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time"


def is_unet_pipeline(pipe: Any) -> bool:
    return all(hasattr(pipe, name) for name in ("unet", "vae", "encode_prompt", "scheduler"))


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, factor: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4), per tile: match the std of the conditional prediction."""
    dims = list(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return factor * rescaled + (1 - factor) * guided


def weights_fingerprint(pipe: Any) -> str:
    """A short hash of the UNet and VAE configs and of a slice of the UNet's first and last weights."""
    import hashlib
    import json

    h = hashlib.sha256()
    for component in (pipe.unet, pipe.vae):
        h.update(json.dumps(dict(component.config), sort_keys=True, default=str).encode())
    params = list(pipe.unet.parameters())
    for p in (params[0], params[-1]):
        h.update(p.detach().flatten()[:4096].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


class DiffusersUNetBackend:
    """Wraps a loaded StableDiffusion(XL)Pipeline (or any pipeline with the same components)."""

    def __init__(self, pipe: Any, name: str = "", preset: ModelPreset | None = None):
        if not is_unet_pipeline(pipe):
            raise GigadiffError(
                f"model {name or type(pipe).__name__!r} is a {type(pipe).__name__}, which is not a UNet "
                "pipeline (SD 1.x/2.x or SDXL); gigadiff has no backend for it yet"
            )
        self.pipe = pipe
        self.vae_tiling = VaeTiling()
        self.unet = pipe.unet
        self.sdxl = is_sdxl(pipe)
        self.device = self.unet.device
        self.dtype = self.unet.dtype
        self.base_scheduler = pipe.scheduler
        factor = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        sample = self.unet.config.sample_size
        sample = sample if isinstance(sample, int) else max(sample)
        steps, guidance = (preset.steps, preset.guidance) if preset else ((30, 5.0) if self.sdxl else (30, 7.5))
        native = preset.native_size if preset and preset.native_size else sample * factor
        self.info = ModelInfo(
            fingerprint=weights_fingerprint(pipe),
            name=name or getattr(pipe, "name_or_path", "") or type(pipe).__name__,
            family="sdxl" if self.sdxl else "sd",
            latent_channels=self.unet.config.in_channels,
            vae_scale_factor=factor,
            native_size=native,
            default_steps=steps,
            default_guidance=guidance,
            can_encode=True,
        )

    @torch.no_grad()
    def condition(
        self,
        prompt: str,
        negative_prompt: str,
        guidance: float,
        canvas_px: tuple[int, int],
        guidance_rescale: float = 0.0,
        **_: Any,
    ) -> UNetConditioning:
        guidance_embedded = self.unet.config.time_cond_proj_dim is not None
        cfg = guidance > 1.0 and not guidance_embedded
        negative = negative_prompt or None
        pooled = negative_pooled = None
        if self.sdxl:
            embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
                prompt=prompt,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=cfg,
                negative_prompt=negative,
            )
        else:
            embeds, negative_embeds = self.pipe.encode_prompt(prompt, self.device, 1, cfg, negative_prompt=negative)
        timestep_cond = None
        if guidance_embedded:
            w = torch.tensor([guidance - 1.0])
            timestep_cond = self.pipe.get_guidance_scale_embedding(
                w, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(self.device, self.dtype)
        return UNetConditioning(
            prompt_embeds=embeds,
            negative_embeds=negative_embeds if cfg else None,
            pooled=pooled,
            negative_pooled=negative_pooled if cfg else None,
            guidance=guidance,
            guidance_rescale=guidance_rescale,
            canvas_px=canvas_px,
            timestep_cond=timestep_cond,
        )

    def _time_ids(self, tiles: Sequence[Tile], cond: UNetConditioning) -> torch.Tensor:
        f = self.info.vae_scale_factor
        rows = [[*cond.canvas_px, t.y * f, t.x * f, t.h * f, t.w * f] for t in tiles]
        return torch.tensor(rows, dtype=cond.prompt_embeds.dtype, device=self.device)

    def _inputs(
        self, n: int, cond: UNetConditioning, tiles: Sequence[Tile], branch: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Text embeddings and SDXL added conditioning for n tiles of one branch (0: unconditional, 1: prompt)."""
        embeds = cond.prompt_embeds if branch else cond.negative_embeds
        assert embeds is not None
        added = None
        if self.sdxl:
            pooled = cond.pooled if branch else cond.negative_pooled
            assert pooled is not None
            added = {"text_embeds": pooled.expand(n, -1), "time_ids": self._time_ids(tiles, cond)}
        return embeds.expand(n, -1, -1), added

    def _unet(self, x: torch.Tensor, t: Any, embeds: torch.Tensor, added: Any, cond: UNetConditioning):
        timestep_cond = None if cond.timestep_cond is None else cond.timestep_cond.expand(x.shape[0], -1)
        return self.unet(x, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond, added_cond_kwargs=added,
                         return_dict=False)[0].float()  # fmt: skip

    @torch.no_grad()
    def predict(
        self, latent_tiles: torch.Tensor, t: Any, cond: UNetConditioning, tiles: Sequence[Tile]
    ) -> torch.Tensor:
        n = latent_tiles.shape[0]
        x = latent_tiles.to(self.device, self.dtype)
        if not cond.uses_cfg:
            return self._unet(x, t, *self._inputs(n, cond, tiles, 1), cond)
        neg, neg_added = self._inputs(n, cond, tiles, 0)
        pos, pos_added = self._inputs(n, cond, tiles, 1)
        added = None
        if pos_added is not None and neg_added is not None:
            added = {k: torch.cat([neg_added[k], pos_added[k]]) for k in pos_added}
        out = self._unet(torch.cat([x, x]), t, torch.cat([neg, pos]), added, cond)
        uncond, text = out.chunk(2)
        return self.combine(uncond, text, cond)

    @torch.no_grad()
    def predict_branch(
        self, latent_tiles: torch.Tensor, t: Any, cond: UNetConditioning, tiles: Sequence[Tile], branch: int
    ) -> torch.Tensor:
        """One half of classifier-free guidance (0: unconditional, 1: conditional), for splitting over ranks."""
        x = latent_tiles.to(self.device, self.dtype)
        return self._unet(x, t, *self._inputs(x.shape[0], cond, tiles, branch), cond)

    def combine(self, uncond: torch.Tensor, text: torch.Tensor, cond: UNetConditioning) -> torch.Tensor:
        """Classifier-free guidance from the two halves (with guidance rescale when asked)."""
        out = uncond + cond.guidance * (text - uncond)
        if cond.guidance_rescale > 0:
            out = rescale_guidance(out, text, cond.guidance_rescale)
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.pipe.vae, latents, self.vae_tiling)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> diffusion-space latents, by the tiled VAE: a sample of the posterior
        drawn with `generator` (as diffusers' img2img pipelines do), or its mean without one."""
        latents = TiledVAE(self.pipe.vae, self.vae_tiling).encode(images, generator is not None, generator)
        return latents.to(self.device)

    def stream_decode(self, latents: torch.Tensor, sink: TileSink) -> None:
        """Decode into `sink` tile by tile (see gigadiff.vae.tiled)."""
        stream_decode(self.pipe.vae, latents, sink, self.vae_tiling)

    def check_decode(self, batch: int, height_px: int, width_px: int) -> None:
        """Raise GigadiffError now if decoding an image of this size cannot fit the VAE memory settings."""
        f = self.info.vae_scale_factor
        plan_decode(self.pipe.vae, self.vae_tiling, batch, height_px // f, width_px // f)
