"""FLUX.2 ([dev] and [klein]): a flow-matching MMDiT over patchified latents of AutoencoderKLFlux2.

- **The canvas** is FLUX.2's diffusion space, as its pipelines draw the noise: the VAE's latents patchified
  2x2 (4x the channels at 1/16 of the image size) and normalised by the VAE's BatchNorm running statistics.
  Each canvas pixel is one token, so tiles are any whole number of canvas pixels (16 image pixels). The codec
  maps the canvas to the VAE's latents (x std + mean, unpatchify) and back, exactly as the pipelines do.
- **Prompts**: FLUX.2 [dev] stacks hidden states of a Mistral-3 text encoder, [klein] of a Qwen3 encoder,
  through the pipelines' own `encode_prompt`.
- **Guidance**: [dev] embeds the guidance scale (one call per tile); [klein] uses classifier-free guidance
  against the empty prompt (its pipeline's rule) above 1, and none when it is step-distilled.
- **Timestep shift**: FLUX.2's empirical rule, mu from tokens and steps (gigadiff.backends.flow).
- **Positions**: 4-axis RoPE ids (0, row, col, 0), tile-local by default, canvas coordinates with
  `--positions global` (one call per tile: the transformer takes one set of ids per call).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from gigadiff.backends.adapter import NegativeGuided, TransformerBackend
from gigadiff.backends.codec import VaeCodec
from gigadiff.backends.family import Family, Preset, vae_factor
from gigadiff.backends.flow import grid_ids
from gigadiff.facts import ShiftRule
from gigadiff.lazy import no_grad, torch

if TYPE_CHECKING:
    import torch as torch_types

    from gigadiff.backends.base import Backend
    from gigadiff.backends.source import ModelSource
    from gigadiff.facts import ModelInfo
    from gigadiff.geometry import Tile


@dataclass(frozen=True)
class Flux2Conditioning(NegativeGuided):
    embeds: torch_types.Tensor
    text_ids: torch_types.Tensor
    negative: tuple[torch_types.Tensor, torch_types.Tensor] | None
    guidance: float | None
    """The embedded guidance scale ([dev]); None where guidance is classifier-free or absent."""
    scale: float
    global_positions: bool


def patchify(x: torch_types.Tensor) -> torch_types.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], each channel's 2x2 patch in row-major order (FLUX.2's layout)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: torch_types.Tensor) -> torch_types.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


class Flux2Codec(VaeCodec):
    """AutoencoderKLFlux2 with FLUX.2's map between the canvas and the VAE's latents (patchify, BatchNorm)."""

    def __init__(self, vae: Any, device: Any, activate: Any):
        super().__init__(vae, device, to_vae=self._to_vae, from_vae=self._from_vae, sample_posterior=False,
                         activate=activate)  # fmt: skip

    def _stats(self, like: torch_types.Tensor) -> tuple[torch_types.Tensor, torch_types.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def _to_vae(self, latents: torch_types.Tensor) -> torch_types.Tensor:
        mean, std = self._stats(latents)
        return unpatchify(latents * std + mean)

    def _from_vae(self, latents: torch_types.Tensor) -> torch_types.Tensor:
        patched = patchify(latents)
        mean, std = self._stats(patched)
        return (patched - mean) / std


class Flux2Backend(TransformerBackend):
    def __init__(self, pipe: Any, info: ModelInfo):
        super().__init__(pipe, info)
        self.distilled = bool(getattr(pipe.config, "is_distilled", False))

    def make_codec(self) -> VaeCodec:
        return Flux2Codec(self.pipe.vae, self.device, self.activate_vae)

    @no_grad
    def condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> Flux2Conditioning:  # fmt: skip
        scale = 0.0 if guidance is None else guidance
        embeds, text_ids = self.pipe.encode_prompt(prompt=prompt, device=self.device, **self.prompt_options())
        negative = None
        if self.info.guidance_kind == "cfg" and self.info.runs_cfg(scale, ""):  # [klein]: against "", as its pipeline
            negative = self.pipe.encode_prompt(prompt="", device=self.device, **self.prompt_options())
        embedded = guidance if self.transformer.config.guidance_embeds else None
        return Flux2Conditioning(embeds, text_ids, negative, embedded, scale, options.get("positions") == "global")

    def planned_condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> Flux2Conditioning:  # fmt: skip
        """Its pipeline pads every prompt to its token limit (its encoder's masks read data, which `meta` tensors do
        not have): hidden states and text ids of that length."""
        scale = 0.0 if guidance is None else guidance
        tokens = self.prompt_options().get("max_sequence_length", 512)

        def text() -> tuple[torch_types.Tensor, torch_types.Tensor]:
            width = self.transformer.config.joint_attention_dim
            return (torch.empty(1, tokens, width, device=self.device, dtype=self.dtype),
                    torch.zeros(1, tokens, 4, device=self.device, dtype=torch.long))  # fmt: skip

        negative = text() if self.info.guidance_kind == "cfg" and self.info.runs_cfg(scale, "") else None
        embedded = guidance if self.transformer.config.guidance_embeds else None
        embeds, text_ids = text()
        return Flux2Conditioning(embeds, text_ids, negative, embedded, scale, options.get("positions") == "global")

    def branch_inputs(self, cond: Flux2Conditioning, branch: int, tiles: Sequence[Tile]) -> Any:
        """A pass's text embeddings and text ids, per tile."""
        text = (cond.embeds, cond.text_ids) if branch else cond.negative
        assert text is not None
        embeds, text_ids = text
        return embeds.expand(len(tiles), -1, -1), text_ids.expand(len(tiles), -1, -1)

    def batches(self, cond: Flux2Conditioning) -> bool:
        return False  # [klein]'s pipeline runs its two passes as calls of their own

    def one_call_per_tile(self, cond: Flux2Conditioning) -> bool:
        return cond.global_positions  # the transformer takes one set of position ids per call

    def run(self, x: torch_types.Tensor, t: Any, cond: Flux2Conditioning, tiles: Sequence[Tile],
            inputs: Any) -> torch_types.Tensor:  # fmt: skip
        embeds, text_ids = inputs
        n, c, h, w = x.shape
        top, left = (tiles[0].y, tiles[0].x) if cond.global_positions else (0, 0)
        ids = grid_ids(h, w, top, left, axes=4, dtype=torch.int64, device=self.device)
        tokens = x.to(self.device, self.transformer.dtype).reshape(n, c, h * w).permute(0, 2, 1)
        guidance = None
        if cond.guidance is not None:
            guidance = torch.full([n], cond.guidance, device=self.device, dtype=torch.float32)
        timestep = torch.as_tensor(t, device=self.device).expand(n).to(embeds.dtype)
        out = self.transformer(
            hidden_states=tokens,
            timestep=timestep / 1000,
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=ids.unsqueeze(0).expand(n, -1, -1),
            return_dict=False,
        )[0]
        return out[:, : h * w].float().permute(0, 2, 1).reshape(n, c, h, w)


class Flux2(Family):
    name = "flux2"
    attention_backends = True
    fp16_risk = "FLUX.2's activations overflow fp16 (its pipeline runs in bf16)"
    pipelines = ("Flux2Pipeline",)
    single_file_markers: ClassVar[tuple[str, ...]] = (
        "double_stream_modulation_img.",
        "model.diffusion_model.double_stream_modulation_img.",
    )
    presets = (Preset("flux2-dev", "black-forest-labs/FLUX.2-dev", steps=50, guidance=4.0, gated=True),)
    scheduler_kind = "flow"
    guidance_kind = "embedded"
    positions = "rope"
    vae = "AutoencoderKLFlux2"
    default_native = 1024
    default_steps = 50
    default_guidance = 4.0

    def describe(self, source: ModelSource) -> ModelInfo:
        transformer = source.config("transformer")
        return self.base_info(
            source,
            latent_channels=int(transformer.get("in_channels", 128)),
            vae_scale_factor=2 * vae_factor(source),
            guidance_kind=self.guidance(source, transformer),
            shift_rule=ShiftRule("empirical"),
        )

    def guidance(self, source: ModelSource, transformer: dict[str, Any]) -> str:
        return "embedded" if transformer.get("guidance_embeds", True) else "none"

    def adapt(self, pipe: Any, info: ModelInfo) -> Backend:
        return Flux2Backend(pipe, info)


class Flux2Klein(Flux2):
    name = "flux2-klein"
    pipelines = ("Flux2KleinPipeline",)
    single_file_markers = ()
    presets = (Preset("flux2-klein", "black-forest-labs/FLUX.2-klein-4B", steps=4, guidance=1.0),)
    default_steps = 50
    default_guidance = 4.0

    def guidance(self, source: ModelSource, transformer: dict[str, Any]) -> str:
        """Classifier-free against the empty prompt, none for the step-distilled models."""
        return "none" if source.index.get("is_distilled") else "cfg"
