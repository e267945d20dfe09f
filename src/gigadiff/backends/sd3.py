"""Stable Diffusion 3 and 3.5: a flow-matching MMDiT over 2x2 patches of a 16-channel AutoencoderKL's latents.

- **Prompts**: CLIP-L and CLIP-G (hidden states and pooled outputs) and T5's hidden states, through the
  pipeline's own `encode_prompt`.
- **Guidance**: classifier-free with a negative prompt (uncond + scale x (cond - uncond)), both passes in one
  call as the pipeline batches them; off at a scale of 1 or less (SD3.5 Large Turbo runs without it).
- **Schedule**: the scheduler's fixed shift (3.0 for the released models), or mu where a config asks for it.
- **Positions**: the patch embedding adds a crop of a learned table of `pos_embed_max_size` patches a side,
  centred on the table whatever the input (diffusers' rule). Tile-local by default: every tile gets the
  centred crop a whole image of its size gets. With `--positions global` the canvas is centred on the table
  and each tile takes the crop at its own place on it, so neighbouring tiles agree on every token's position;
  the canvas must then fit the table (192 patches: 3072 px for SD3 Medium and SD3.5 Large, 384: 6144 px for
  SD3.5 Medium), and the patch embedding takes one crop per call, so tiles run one per call.
- **ControlNets** (`--control`, SD3ControlNetModel): the control image is resized to the canvas as
  StableDiffusion3ControlNetPipeline resizes it, VAE-encoded (tiled) once per run and each tile's net fed the crop
  of those latents under its window, with the pass's prompt and pooled embedding (zeros, and latents without
  the VAE's shift, for InstantX-style nets that ask for it), its own position table cropped as the
  transformer's. The pipeline draws the encoding's posterior sample from torch's global generator, one sample per
  guidance pass; gigadiff draws one from a generator seeded from the run's seed, so runs repeat and the run's
  noise stays the pipeline's. SD3.5's large ControlNets, which
  have no patch embedding of their own, get a copy of the transformer's, as the pipeline gives them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from gigadiff.backends.adapter import NegativeGuided, TransformerBackend
from gigadiff.backends.control import Control, encoded_controls, run_controls, summed_residuals
from gigadiff.backends.family import Family, Preset, flow_shift_rule, vae_factor
from gigadiff.lazy import no_grad, torch
from gigadiff.overrides import instance_override

if TYPE_CHECKING:
    import torch as torch_types

    from gigadiff.backends.base import Backend
    from gigadiff.backends.source import ModelSource
    from gigadiff.facts import ModelInfo
    from gigadiff.geometry import Tile


@dataclass(frozen=True)
class SD3Conditioning(NegativeGuided):
    embeds: torch_types.Tensor
    pooled: torch_types.Tensor
    negative: tuple[torch_types.Tensor, torch_types.Tensor] | None
    scale: float
    global_positions: bool
    canvas_patches: tuple[int, int]
    """The canvas in patches (rows, columns): where it sits on the position table with global positions."""
    controls: tuple[Control, ...] = ()


def table_crop(table_size: int, canvas: tuple[int, int], tile: Tile, patch: int) -> tuple[int, int]:
    """Top-left corner, in patches, of a tile's crop of the position table: the canvas centred on the table
    (diffusers' rule for a whole image), the tile at its place on the canvas."""
    top = (table_size - canvas[0]) // 2 + tile.y // patch
    left = (table_size - canvas[1]) // 2 + tile.x // patch
    return top, left


def crop_at(embedding: Any, corner: tuple[int, int]) -> contextlib.AbstractContextManager[None]:
    """While inside, the patch embedding crops its position table at `corner` instead of its centre."""
    top, left = corner
    size = embedding.pos_embed_max_size

    def cropped(height: int, width: int) -> Any:
        h, w = height // embedding.patch_size, width // embedding.patch_size
        table = embedding.pos_embed.reshape(1, size, size, -1)
        return table[:, top : top + h, left : left + w, :].reshape(1, h * w, -1)

    return instance_override(embedding, "cropped_pos_embed", cropped)


POSTERIOR_SEED_OFFSET = 0x5D3C
"""Added to the run's seed to seed the control images' posterior draws (a stream apart from the noise)."""


class SD3Backend(TransformerBackend):
    def __init__(self, pipe: Any, info: ModelInfo):
        super().__init__(pipe, info)
        self.patch = int(self.transformer.config.patch_size)

    def default_sigmas(self, steps: int) -> list[float] | None:
        """None: the pipeline gives no sigmas; the scheduler spaces its own (from its shifted range)."""
        return None

    @no_grad
    def condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> SD3Conditioning:  # fmt: skip
        scale = 0.0 if guidance is None else guidance
        cfg = self.info.runs_cfg(scale, negative_prompt)
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt or None, **self.prompt_options(),
        )  # fmt: skip
        f = self.info.vae_scale_factor * self.patch
        canvas = (canvas_px[0] // f, canvas_px[1] // f)
        processor = partial(_control_processor, self.info.vae_scale_factor)
        controls = run_controls(options, self.controlnets, processor, canvas_px, self.device, self.dtype)
        if options.get("positions") == "global":
            for control in controls:
                _check_table(control.model.pos_embed, canvas, f)
        return SD3Conditioning(embeds, pooled, (negative, negative_pooled) if cfg else None, scale,
                               options.get("positions") == "global", canvas, controls)  # fmt: skip

    def add_controlnets(self, models: Mapping[str, Any]) -> None:
        """SD3.5's large ControlNets (`use_pos_embed` off) read the tokens through a copy of the transformer's
        patch embedding, as StableDiffusion3ControlNetPipeline gives them one."""
        for model in models.values():
            if model.pos_embed is None:
                model.pos_embed = model._get_pos_embed_from_transformer(self.transformer).to(model.device, model.dtype)
        super().add_controlnets(models)

    def drawn_conditioning(self, cond: SD3Conditioning, generator: Any, tiling: Any, listener: Any = None) -> Any:
        """The control images VAE-encoded (tiled); InstantX-style nets (zero pooled embeddings) take the latents
        without the VAE's shift, as the pipeline gives them. The pipeline draws the posterior sample from torch's
        global generator, not the run's, so the run's noise is drawn as if nothing came before it: the sample is
        drawn from a generator of its own, seeded from the run's seed (the same draws on a resume)."""
        if not cond.controls:
            return cond
        from gigadiff.noise import seeded_generator

        draws = seeded_generator(generator.initial_seed() + POSTERIOR_SEED_OFFSET)
        encoded = encoded_controls(cond.controls, lambda c: True, self.codec, draws, tiling, listener, self.dtype)
        config = self.pipe.vae.config
        unshift = float(config.get("shift_factor") or 0.0) * float(config.get("scaling_factor") or 1.0)
        controls = tuple(replace(c, image=c.image + unshift) if _zero_pooled(c) else c for c in encoded)
        return replace(cond, controls=controls)

    def branch_inputs(self, cond: SD3Conditioning, branch: int, tiles: Sequence[Tile]) -> Any:
        """A pass's joint text embeddings and pooled CLIP embedding, per tile."""
        text = (cond.embeds, cond.pooled) if branch else cond.negative
        assert text is not None
        embeds, pooled = text
        return embeds.expand(len(tiles), -1, -1), pooled.expand(len(tiles), -1)

    def one_call_per_tile(self, cond: SD3Conditioning) -> bool:
        return cond.global_positions  # the patch embedding takes one crop of its table per call

    def run(self, x: torch_types.Tensor, t: Any, cond: SD3Conditioning, tiles: Sequence[Tile],
            inputs: Any) -> torch_types.Tensor:  # fmt: skip
        """The transformer's velocity for tiles x [N, C, h, w]."""
        embeds, pooled = inputs
        hidden = x.to(self.device, self.transformer.dtype)
        timestep = torch.as_tensor(t, device=self.device).expand(x.shape[0])
        with contextlib.ExitStack() as stack:
            if cond.global_positions:  # the transformer's table and each ControlNet's, cropped at the tile
                tables = [c.model.pos_embed for c in cond.controls if c.model.pos_embed.pos_embed_max_size]
                for embedding in (self.transformer.pos_embed, *tables):
                    corner = table_crop(embedding.pos_embed_max_size, cond.canvas_patches, tiles[0], self.patch)
                    stack.enter_context(crop_at(embedding, corner))
            blocks = self.control_residuals(hidden, t, timestep, embeds, pooled, cond, tiles)
            out = self.transformer(
                hidden_states=hidden,
                timestep=timestep,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                block_controlnet_hidden_states=blocks,
                return_dict=False,
            )[0]
        return out.float()

    def control_residuals(self, hidden: torch_types.Tensor, t: Any, timestep: torch_types.Tensor,
                          embeds: torch_types.Tensor, pooled: torch_types.Tensor, cond: SD3Conditioning,
                          tiles: Sequence[Tile]) -> Any:  # fmt: skip
        """The block residuals of the ControlNets acting at this step (summed), each fed its tiles' crops of the
        encoded image with the call's prompt (None for nets without a text embedder) and pooled embedding (zeros
        for InstantX-style nets); None when none acts."""
        blocks: Any = None
        for control in self.acting(cond.controls, t):
            config = control.model.config
            residuals = control.model(hidden_states=hidden, controlnet_cond=control.crops(tiles, 1),
                                      conditioning_scale=control.scale, timestep=timestep,
                                      encoder_hidden_states=embeds if config.joint_attention_dim is not None else None,
                                      pooled_projections=torch.zeros_like(pooled) if _zero_pooled(control) else pooled,
                                      return_dict=False)[0]  # fmt: skip
            blocks = summed_residuals(blocks, residuals)
        return blocks


def _check_table(embedding: Any, canvas: tuple[int, int], patch_px: int) -> None:
    """Refuse global positions on a canvas larger than a ControlNet's own position table (it can be smaller than
    the transformer's) before the first step: a net from the hub, whose config was not read before loading."""
    from gigadiff.backends.control import refuse_small_table

    if embedding.pos_embed_max_size:
        refuse_small_table(embedding.pos_embed_max_size * patch_px, canvas[1] * patch_px, canvas[0] * patch_px)


def _zero_pooled(control: Control) -> bool:
    """An InstantX-style SD3 ControlNet: zero pooled embeddings, latents without the VAE's shift."""
    return bool(control.model.config.force_zeros_for_pooled_projection)


def _control_processor(vae_scale_factor: int) -> Any:
    """StableDiffusion3ControlNetPipeline's control image processor: values in [-1, 1]."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale_factor)


class StableDiffusion3(Family):
    name = "sd3"
    fp16_risk = "SD3's T5 text encoder overflows fp16 (its pipeline runs in bf16 or fp16 without T5)"
    pipelines = ("StableDiffusion3Pipeline",)
    single_file_markers = ("joint_blocks.", "model.diffusion_model.joint_blocks.")
    single_file_pipeline = "StableDiffusion3Pipeline"
    presets = (
        Preset("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", steps=28, guidance=7.0, gated=True),
        Preset("sd35-medium", "stabilityai/stable-diffusion-3.5-medium", steps=40, guidance=4.5, gated=True),
        Preset("sd35-large", "stabilityai/stable-diffusion-3.5-large", steps=28, guidance=3.5, gated=True),
        Preset("sd35-large-turbo", "stabilityai/stable-diffusion-3.5-large-turbo", steps=4, guidance=0.0, gated=True),
    )
    scheduler_kind = "flow"
    guidance_kind = "cfg"
    positions = "table"
    controlnet_class = "SD3ControlNetModel"
    latent_multiple = 2
    default_native = 1024
    default_steps = 28
    default_guidance = 7.0

    def describe(self, source: ModelSource) -> ModelInfo:
        transformer = source.config("transformer")
        patch = int(transformer.get("patch_size", 2))
        factor = vae_factor(source)
        table = transformer.get("pos_embed_max_size")
        sample = transformer.get("sample_size")
        return self.base_info(
            source,
            latent_channels=int(transformer.get("in_channels", 16)),
            vae_scale_factor=factor,
            latent_multiple=patch,
            shift_rule=flow_shift_rule(source),
            native_size=int(sample) * factor if sample else self.default_native,
            max_global_px=int(table) * patch * factor if table else None,
        )

    def adapt(self, pipe: Any, info: ModelInfo) -> Backend:
        return SD3Backend(pipe, info)
