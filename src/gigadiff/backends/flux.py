"""FLUX.1 (dev, schnell, Krea): a flow-matching MMDiT over 2x2-packed latents of the 16-channel AutoencoderKL.

- **Prompts**: CLIP's pooled output and T5's hidden states, through the pipeline's own `encode_prompt`.
- **Guidance**: guidance-distilled models (dev, Krea) embed the guidance scale in the transformer's
  conditioning: one model call per tile, `--guidance` sets it; schnell has none. True classifier-free guidance
  with a negative prompt (two passes, batched into one call) when `--true-cfg S` is above 1.
- **Packing**: the canvas is the VAE's latent (noise drawn unpacked, as FluxPipeline draws it); each tile is
  packed into 2x2 tokens for the transformer and its velocity unpacked again, so tiles, overlaps and shifts
  are multiples of 2 latent pixels (16 image pixels) and the scheduler steps the canvas elementwise exactly
  as it would step the packed sequence.
- **ControlNets** (`--control`, FluxControlNetModel): the control image is resized to the canvas as
  FluxControlNetPipeline resizes it; InstantX-style nets (no hint block) take it VAE-encoded, sampled from the
  posterior with the run's generator before the noise as the pipeline does (`drawn_conditioning`), each tile the
  packed crop of those latents under its window; XLabs-style nets (a hint block) take each tile's crop of the
  pixels and repeat their block residuals over the transformer's blocks. The nets see the prompt (never the
  negative of true CFG, as in the pipeline); several add their residuals, as FluxMultiControlNetModel does.
- **Positions**: RoPE ids (0, row, col) per token. Tile-local by default: every tile is a crop the size the
  model was trained on, with the ids of a whole image at that size. `--positions global` gives every tile its
  canvas coordinates instead; FLUX's transformer takes one set of ids per call, so tiles then run one per call
  (see gigadiff.backends.flow for the timestep shift).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from gigadiff.backends.adapter import NegativeGuided, Shared, TransformerBackend
from gigadiff.backends.control import Control, encoded_controls, pipeline_processor, run_controls, summed_residuals
from gigadiff.backends.family import Family, Preset, flow_shift_rule, vae_factor
from gigadiff.backends.flow import grid_ids, pack, unpack
from gigadiff.lazy import no_grad, torch

if TYPE_CHECKING:
    import torch as torch_types

    from gigadiff.backends.base import Backend
    from gigadiff.backends.source import ModelSource
    from gigadiff.facts import ModelInfo
    from gigadiff.geometry import Tile


Text = tuple["torch_types.Tensor", "torch_types.Tensor", "torch_types.Tensor"]
"""A prompt's T5 embeddings, CLIP pooled embedding and text ids."""


@dataclass(frozen=True)
class FluxConditioning(NegativeGuided):
    embeds: torch_types.Tensor
    pooled: torch_types.Tensor
    text_ids: torch_types.Tensor
    negative: Text | None
    """(embeds, pooled, text_ids) of the negative prompt, with true classifier-free guidance."""
    guidance: float | None
    """The embedded guidance scale (dev, Krea), None for models without it (schnell)."""
    scale: float
    """The true classifier-free guidance scale."""
    global_positions: bool
    controls: tuple[Control, ...] = ()
    control_guidance: float | None = None
    """The guidance scale as given, for ControlNets that embed it (their pipeline gives it whatever the
    transformer takes)."""


class FluxBackend(TransformerBackend):
    @no_grad
    def condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> FluxConditioning:  # fmt: skip
        true_cfg = float(options.get("true_cfg") or 1.0)
        prompting = self.prompt_options()
        embeds, pooled, text_ids = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.device,
                                                           **prompting)  # fmt: skip
        negative = None
        if self.info.runs_cfg(true_cfg, negative_prompt):
            negative = self.pipe.encode_prompt(prompt=negative_prompt, prompt_2=None, device=self.device, **prompting)
        embedded = guidance if self.transformer.config.guidance_embeds else None
        processor = partial(pipeline_processor, self.info.vae_scale_factor)
        controls = run_controls(options, self.controlnets, processor, canvas_px, self.device, self.dtype)
        return FluxConditioning(embeds, pooled, text_ids, negative, embedded, true_cfg,
                                options.get("positions") == "global", controls, guidance)  # fmt: skip

    def drawn_conditioning(self, cond: FluxConditioning, generator: Any, tiling: Any, listener: Any = None) -> Any:
        """InstantX-style ControlNets' images encoded (tiled), a posterior sample drawn with `generator`."""
        if not cond.controls:
            return cond
        controls = encoded_controls(cond.controls, _takes_latents, self.codec, generator, tiling, listener, self.dtype)
        return replace(cond, controls=controls)

    def branch_inputs(self, cond: FluxConditioning, branch: int, tiles: Sequence[Tile]) -> Any:
        """A pass's T5 embeddings and CLIP pooled embedding per tile, and its text ids (shared)."""
        text = (cond.embeds, cond.pooled, cond.text_ids) if branch else cond.negative
        assert text is not None
        embeds, pooled, text_ids = text
        n = len(tiles)
        return embeds.expand(n, -1, -1), pooled.expand(n, -1), Shared(text_ids)

    def batches(self, cond: FluxConditioning) -> bool:
        """True guidance's two passes in one call ([uncond..., cond...]; T5 embeddings share one length), except
        with global positions, where every tile is a call of its own."""
        return not cond.global_positions

    def one_call_per_tile(self, cond: FluxConditioning) -> bool:
        return cond.global_positions  # the transformer takes one set of position ids per call

    def run(self, x: torch_types.Tensor, t: Any, cond: FluxConditioning, tiles: Sequence[Tile],
            inputs: Any) -> torch_types.Tensor:  # fmt: skip
        """The transformer's velocity for tiles x [N, C, h, w] (packed, run, unpacked), one text per row."""
        n, _, h, w = x.shape
        embeds, pooled, text_ids = inputs
        top, left = (tiles[0].y // 2, tiles[0].x // 2) if cond.global_positions else (0, 0)
        # fp32 ids whatever the model's dtype: bf16 holds integers exactly only up to 256, so beyond 4096 px
        # (256 tokens) neighbouring columns would share a rotary position (the transformer reads ids as floats)
        ids = grid_ids(h // 2, w // 2, top, left, dtype=torch.float32, device=self.device)
        guidance = None
        if cond.guidance is not None:
            guidance = torch.full([n], cond.guidance, device=self.device, dtype=torch.float32)
        timestep = torch.as_tensor(t, device=self.device).expand(n).to(embeds.dtype)
        hidden = pack(x.to(self.device, self.transformer.dtype))
        blocks, singles, repeat = self.pass_shared(
            hidden, t, tiles, cond.controls,
            lambda rows, part: self.control_residuals(rows, t, timestep[: len(part)], cond, part, ids))  # fmt: skip
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=ids,
            controlnet_block_samples=blocks,
            controlnet_single_block_samples=singles,
            controlnet_blocks_repeat=repeat,
            return_dict=False,
        )[0]
        return unpack(out.float(), h, w)

    def control_residuals(self, hidden: torch_types.Tensor, t: Any, timestep: torch_types.Tensor,
                          cond: FluxConditioning, tiles: Sequence[Tile],
                          ids: torch_types.Tensor) -> tuple[Any, Any, bool]:  # fmt: skip
        """The block residuals of the ControlNets acting at this step (summed), each fed its tiles' crops and the
        prompt (in both passes of true guidance, as the pipeline: `run` computes them once for both), with whether
        the transformer repeats them over its blocks (XLabs-style nets); (None, None, False) when none acts."""
        blocks: Any = None
        singles: Any = None
        repeat = False
        n = hidden.shape[0]
        for control in self.acting(cond.controls, t):
            latent = _takes_latents(control)
            crops = control.crops(tiles, 1 if latent else self.info.vae_scale_factor)
            guidance = None
            if control.model.config.guidance_embeds:
                guidance = torch.full([n], float(cond.control_guidance or 0.0), device=self.device)
            union = {}
            if control.mode is not None:  # a union net: its kind of image, one per row (the pipeline's control_mode)
                union["controlnet_mode"] = torch.full([n, 1], control.mode, dtype=torch.long, device=self.device)
            b, s = control.model(hidden_states=hidden, controlnet_cond=pack(crops) if latent else crops,
                                 conditioning_scale=control.scale, timestep=timestep / 1000, guidance=guidance,
                                 pooled_projections=cond.pooled.expand(n, -1),
                                 encoder_hidden_states=cond.embeds.expand(n, -1, -1), txt_ids=cond.text_ids,
                                 img_ids=ids, return_dict=False, **union)  # fmt: skip
            blocks, singles, repeat = summed_residuals(blocks, b), summed_residuals(singles, s), not latent
        return blocks, singles, repeat


def _takes_latents(control: Control) -> bool:
    """An InstantX-style FLUX ControlNet (no hint block) takes the VAE's latents of its image; an XLabs-style one
    its pixels."""
    return control.model.input_hint_block is None


class Flux(Family):
    name = "flux"
    attention_backends = True
    fp16_risk = "FLUX.1's activations overflow fp16 (its pipeline runs in bf16)"
    pipelines = ("FluxPipeline",)
    single_file_markers = ("double_blocks.", "model.diffusion_model.double_blocks.")
    single_file_pipeline = "FluxPipeline"
    presets = (
        Preset("flux-dev", "black-forest-labs/FLUX.1-dev", steps=28, guidance=3.5, gated=True),
        Preset("flux-schnell", "black-forest-labs/FLUX.1-schnell", steps=4, guidance=0.0),
        Preset("flux-krea", "black-forest-labs/FLUX.1-Krea-dev", steps=28, guidance=4.5, gated=True),
    )
    scheduler_kind = "flow"
    guidance_kind = "embedded"
    negative_required = True  # its pipeline's true CFG runs only with a negative prompt
    controlnet_class = "FluxControlNetModel"
    positions = "rope"
    latent_multiple = 2
    default_native = 1024
    default_steps = 28
    default_guidance = 3.5

    def matches(self, source: ModelSource) -> bool:
        if source.kind == "file":  # FLUX.2's checkpoints share the block names; their modulation is their own
            return super().matches(source) and not any("double_stream_modulation" in k for k in source.file_keys)
        return super().matches(source)

    def describe(self, source: ModelSource) -> ModelInfo:
        transformer = source.config("transformer")
        preset = self.preset(source.preset)
        embedded = bool(transformer.get("guidance_embeds", preset is None or preset.guidance > 0))
        return self.base_info(
            source,
            latent_channels=int(transformer.get("in_channels", 64)) // 4,
            vae_scale_factor=vae_factor(source),
            guidance_kind="embedded" if embedded else "none",
            true_cfg=True,
            shift_rule=flow_shift_rule(source),
            default_steps=self.default_steps if embedded else 4,
        )

    def adapt(self, pipe: Any, info: ModelInfo) -> Backend:
        return FluxBackend(pipe, info)
