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
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gigadiff.backends.adapter import NegativeGuided, TransformerBackend
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
        return SD3Conditioning(embeds, pooled, (negative, negative_pooled) if cfg else None, scale,
                               options.get("positions") == "global", canvas)  # fmt: skip

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
        context: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if cond.global_positions:
            corner = table_crop(self.transformer.pos_embed.pos_embed_max_size, cond.canvas_patches, tiles[0],
                                self.patch)  # fmt: skip
            context = crop_at(self.transformer.pos_embed, corner)
        timestep = torch.as_tensor(t, device=self.device).expand(x.shape[0])
        with context:
            out = self.transformer(
                hidden_states=x.to(self.device, self.transformer.dtype),
                timestep=timestep,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        return out.float()


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
