"""PixArt-Σ: a DiT predicting noise (epsilon, with a learned variance) over 2x2 patches of SD's 4-channel VAE.

- **Prompts**: T5's hidden states and attention mask, through the pipeline's own `encode_prompt` (captions are
  not rewritten: the cleaning the pipeline can do needs optional packages, and it changes the prompt).
- **Guidance**: classifier-free with a negative prompt (empty by default), both passes in one call.
- **Schedule**: a DDPM-family scheduler, as the SD adapters (DPM-Solver++ for the released models).
- **Output**: the transformer predicts noise and variance; the variance half is dropped, as the pipeline does.
- **Sizes**: the pipeline's resolution binning (snapping a request to the aspect ratios it was trained on)
  is for whole images: a tile is already the size it asks for, and the canvas is whatever size was asked.
- **Positions**: sinusoidal, computed by the patch embedding for each tile's size (tile-local).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gigadiff.backends.adapter import NegativeGuided, TransformerBackend
from gigadiff.backends.control import Control
from gigadiff.backends.family import Family, Preset, vae_factor
from gigadiff.lazy import no_grad, torch

if TYPE_CHECKING:
    import torch as torch_types

    from gigadiff.backends.base import Backend
    from gigadiff.backends.source import ModelSource
    from gigadiff.facts import ModelInfo
    from gigadiff.geometry import Tile

Text = tuple["torch_types.Tensor", "torch_types.Tensor"]
"""A prompt's T5 hidden states and attention mask."""


@dataclass(frozen=True)
class PixArtConditioning(NegativeGuided):
    text: Text
    negative: Text | None
    scale: float
    controls: tuple[Control, ...] = ()
    """SANA's ControlNets (gigadiff.backends.sana); PixArt-Σ's pipelines have none."""


class PixArtBackend(TransformerBackend):
    @no_grad
    def condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> PixArtConditioning:  # fmt: skip
        scale = 0.0 if guidance is None else guidance
        cfg = self.info.runs_cfg(scale, negative_prompt)
        embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=cfg, negative_prompt=negative_prompt, device=self.device,
            clean_caption=False, **self.prompt_options(),
        )  # fmt: skip
        return PixArtConditioning((embeds, mask), (negative, negative_mask) if cfg else None, scale)

    def planned_condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> PixArtConditioning:  # fmt: skip
        """Its pipeline pads every prompt to its token limit: hidden states of that length, every token counting
        (the encoder's mask handling reads data, which `meta` tensors do not have)."""
        scale = 0.0 if guidance is None else guidance
        tokens = self.prompt_options().get("max_sequence_length", 300)
        width = self.transformer.config.caption_channels

        def text() -> Text:
            return (torch.empty(1, tokens, width, device=self.device, dtype=self.dtype),
                    torch.ones(1, tokens, device=self.device, dtype=torch.long))  # fmt: skip

        return PixArtConditioning(text(), text() if self.info.runs_cfg(scale, negative_prompt) else None, scale)

    extra_inputs: Mapping[str, Any] = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    """Transformer inputs beyond latents, text and timestep (PixArt's micro-conditions, unused by Σ)."""
    timestep_scale = 1.0
    """What the pipeline multiplies the scheduler's timestep by before the transformer sees it."""

    def branch_inputs(self, cond: PixArtConditioning, branch: int, tiles: Sequence[Tile]) -> Any:
        """A pass's T5 hidden states and attention mask, per tile."""
        text = cond.text if branch else cond.negative
        assert text is not None
        embeds, mask = text
        return embeds.expand(len(tiles), -1, -1), mask.expand(len(tiles), -1)

    def control_inputs(self, hidden: torch_types.Tensor, t: Any, timestep: torch_types.Tensor,
                       cond: PixArtConditioning, tiles: Sequence[Tile], inputs: Any) -> dict[str, Any]:  # fmt: skip
        """The transformer's ControlNet inputs for this call (none: PixArt-Σ's pipelines have no ControlNet)."""
        return {}

    def run(self, x: torch_types.Tensor, t: Any, cond: PixArtConditioning, tiles: Sequence[Tile],
            inputs: Any) -> torch_types.Tensor:  # fmt: skip
        embeds, mask = inputs
        n = x.shape[0]
        timestep = torch.as_tensor(t, device=self.device)
        timestep = (timestep[None] if timestep.ndim == 0 else timestep).expand(n)
        if self.timestep_scale != 1.0:
            timestep = timestep * self.timestep_scale
        hidden = x.to(self.device, self.transformer.dtype)
        out = self.transformer(
            hidden,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=timestep,
            return_dict=False,
            **self.extra_inputs,
            **self.control_inputs(hidden, t, timestep, cond, tiles, inputs),
        )[0]
        channels = x.shape[1]
        if out.shape[1] == 2 * channels:  # learned variance: the noise is the first half
            out = out[:, :channels]
        return out.float()


class PixArtSigma(Family):
    name = "pixart-sigma"
    loras = False
    pipelines = ("PixArtSigmaPipeline",)
    presets = (Preset("pixart-sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", steps=20, guidance=4.5),)
    scheduler_kind = "ddpm"
    guidance_kind = "cfg"
    positions = "none"
    latent_multiple = 2
    default_native = 1024
    default_steps = 20
    default_guidance = 4.5

    def describe(self, source: ModelSource) -> ModelInfo:
        transformer = source.config("transformer")
        factor = vae_factor(source)
        sample = transformer.get("sample_size")
        return self.base_info(
            source,
            latent_channels=int(transformer.get("in_channels", 4)),
            vae_scale_factor=factor,
            latent_multiple=int(transformer.get("patch_size", 2)),
            native_size=int(sample) * factor if sample else self.default_native,
        )

    def adapt(self, pipe: Any, info: ModelInfo) -> Backend:
        return PixArtBackend(pipe, info)
