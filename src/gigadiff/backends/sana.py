"""SANA (1600M at 1024 px, 2K, 4K): a linear-attention DiT predicting flow velocity over SANA's deep-compression
autoencoder (DC-AE, 32x, 32 channels), Gemma-2 prompts.

- **Prompts**: Gemma-2's hidden states and mask through the pipeline's own `encode_prompt`, with the pipeline's
  default "complex human instruction" prefix and sequence length (read from its `__call__`, so a pipeline
  version that changes them is followed).
- **Guidance, outputs, sizes, positions**: as PixArt-Σ (gigadiff.backends.pixart), whose transformer interface
  SANA shares: both passes in one call, resolution binning off for tiles and canvas, positions (when the model
  has them) computed by the patch embedding for each tile's size. The timestep is scaled by the transformer's
  `timestep_scale`, as the pipeline does.
- **Schedule**: flow matching with the model's fixed shift, through its own DPM-Solver (flow sigmas), no sigma
  schedule imposed (the pipeline passes none).
- **ControlNets** (`--control`, SanaControlNetModel): the control image is resized to the canvas as
  SanaControlNetPipeline resizes it, encoded by the DC-AE (tiled, deterministic: the encoder has no posterior) once
  per run, and each tile's net reads the crop of those latents under its window with the pass's prompt; its block
  residuals go to the transformer's blocks. The pipeline takes no schedule window: a START:END is gigadiff's.
- **VAE**: AutoencoderDC (convolutions, per-pixel RMS norms, ReLU linear attention in its deep stages), tiled by
  gigadiff.vae.halo: each linear attention's whole-image summary (the sum of v kᵀ over positions, per head) is
  gathered tile by tile, exactly, so tiled equals whole in both modes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from gigadiff.backends.control import encoded_controls, run_controls, summed_residuals
from gigadiff.backends.family import Family, Preset, flow_shift_rule
from gigadiff.backends.pixart import PixArtBackend, PixArtConditioning
from gigadiff.lazy import no_grad

if TYPE_CHECKING:
    import torch as torch_types

    from gigadiff.backends.base import Backend
    from gigadiff.backends.source import ModelSource
    from gigadiff.facts import ModelInfo
    from gigadiff.geometry import Tile
    from gigadiff.vae.halo import Network


def _control_processor(vae_scale_factor: int) -> Any:
    """SanaControlNetPipeline's control image processor."""
    from diffusers.image_processor import PixArtImageProcessor

    return PixArtImageProcessor(vae_scale_factor=vae_scale_factor)


class SanaBackend(PixArtBackend):
    extra_inputs: Mapping[str, Any] = MappingProxyType({})

    def __init__(self, pipe: Any, info: ModelInfo):
        super().__init__(pipe, info)
        self.timestep_scale = float(getattr(self.transformer.config, "timestep_scale", 1.0) or 1.0)

    samples_posterior = False

    @no_grad
    def condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> PixArtConditioning:  # fmt: skip
        base = super().condition(prompt, negative_prompt, guidance, canvas_px, options)
        processor = partial(_control_processor, self.info.vae_scale_factor)
        controls = run_controls(options, self.controlnets, processor, canvas_px, self.device, self.dtype)
        return replace(base, controls=controls)

    def drawn_conditioning(self, cond: PixArtConditioning, generator: Any, tiling: Any,
                           listener: Any = None) -> Any:  # fmt: skip
        """The control images encoded by the DC-AE (tiled), once per run (it draws nothing)."""
        if not cond.controls:
            return cond
        encoded = encoded_controls(cond.controls, lambda c: True, self.codec, generator, tiling, listener, self.dtype)
        return replace(cond, controls=encoded)

    def control_inputs(self, hidden: torch_types.Tensor, t: Any, timestep: torch_types.Tensor,
                       cond: PixArtConditioning, tiles: Sequence[Tile], inputs: Any) -> dict[str, Any]:  # fmt: skip
        """The block residuals of the ControlNets acting at `t` (summed), each fed its tiles' crops of the encoded
        image with the call's prompt; none when none acts."""
        embeds, mask = inputs
        blocks: Any = None
        for control in self.acting(cond.controls, t):
            dtype = control.model.dtype
            residuals = control.model(hidden.to(dtype), encoder_hidden_states=embeds.to(dtype),
                                      encoder_attention_mask=mask, timestep=timestep,
                                      controlnet_cond=control.crops(tiles, 1), conditioning_scale=control.scale,
                                      return_dict=False)[0]  # fmt: skip
            blocks = summed_residuals(blocks, residuals)
        if blocks is None:
            return {}
        return {"controlnet_block_samples": tuple(b.to(self.transformer.dtype) for b in blocks)}

    def vae_networks(self) -> tuple[Network, Network]:
        return dc_ae_networks(self.pipe.vae)

    def default_sigmas(self, steps: int) -> list[float] | None:
        """None: the pipeline gives no sigmas; its DPM-Solver spaces its own flow sigmas."""
        return None


def _linear_attention_op(attn: Any) -> Any:
    """A DC-AE SanaMultiscaleLinearAttention as a tiled-pass op: its processor's steps around the global sum."""
    import torch

    from gigadiff.vae.passes import LinearAttention

    class DcAeAttention(LinearAttention):
        def qkv(self, x: Any) -> tuple[Any, Any, Any]:
            b, _, h, w = x.shape
            hidden = x.movedim(1, -1)
            qkv = torch.cat([attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)], dim=3).movedim(-1, 1)
            scales = torch.cat([qkv, *(block(qkv) for block in attn.to_qkv_multiscale)], dim=1).float()
            q, k, v = scales.reshape(b, -1, 3 * attn.attention_head_dim, h * w).chunk(3, dim=2)
            return attn.nonlinearity(q), attn.nonlinearity(k), v

        def finish(self, x: Any, attended: Any) -> Any:
            b, _, h, w = x.shape
            out = attn.to_out(attended.to(x.dtype).reshape(b, -1, h, w).movedim(1, -1)).movedim(-1, 1)
            if attn.norm_type == "rms_norm":
                out = attn.norm_out(out.movedim(1, -1)).movedim(-1, 1)
            else:
                out = attn.norm_out(out)
            return out + x if attn.residual_connection else out

    return DcAeAttention(eps=attn.eps)


def dc_ae_networks(vae: Any) -> tuple[Network, Network]:
    """AutoencoderDC as (decoder, encoder) networks: every linear attention is a whole-image op."""
    from diffusers.models.attention_processor import SanaMultiscaleLinearAttention

    from gigadiff.vae.halo import Network, architecture

    factor = 2 ** (len(vae.config.encoder_block_out_channels) - 1)

    def network(part: Any) -> tuple[list[Any], Any]:
        layers = [m for m in part.modules() if isinstance(m, SanaMultiscaleLinearAttention)]
        ops = [_linear_attention_op(m) for m in layers]

        @contextlib.contextmanager
        def install() -> Iterator[None]:
            saved = [m.processor for m in layers]
            try:
                for m, op, plain in zip(layers, ops, saved, strict=True):
                    m.processor = _Hooked(op, plain)
                yield
            finally:
                for m, plain in zip(layers, saved, strict=True):
                    m.processor = plain

        return ops, install

    dec_ops, dec_hooks = network(vae.decoder)
    enc_ops, enc_hooks = network(vae.encoder)
    # a tile's later passes resume after the last block before the attention gathering (resolution stages hold
    # three attentions each)
    decoder = Network(vae.decoder, dec_ops, dec_hooks, int(vae.config.latent_channels), float(factor),
                      architecture=architecture(vae, "decoder"), stages=list(vae.decoder.up_blocks),
                      resumes=[block for stage in vae.decoder.up_blocks for block in stage],
                      module=vae.decoder)  # fmt: skip
    encoder = Network(vae.encoder, enc_ops, enc_hooks, int(vae.config.in_channels), 1.0 / factor, align=factor,
                      architecture=architecture(vae, "encoder"), stages=list(vae.encoder.down_blocks),
                      resumes=[block for stage in vae.encoder.down_blocks for block in stage],
                      module=vae.encoder)  # fmt: skip
    return decoder, encoder


class _Hooked:
    """An attention processor that runs the layer through its tiled-pass op."""

    def __init__(self, op: Any, plain: Any):
        self.op, self.plain = op, plain

    def __call__(self, attn: Any, hidden_states: Any) -> Any:
        return self.op(hidden_states, lambda x: self.plain(attn, x))


class Sana(Family):
    name = "sana"
    pipelines = ("SanaPipeline",)
    presets = (
        Preset("sana-1600m-1024", "Efficient-Large-Model/Sana_1600M_1024px_diffusers", steps=20, guidance=4.5),
        Preset("sana-1600m-4k", "Efficient-Large-Model/Sana_1600M_4Kpx_BF16_diffusers", steps=20, guidance=4.5),
    )
    scheduler_kind = "flow"
    guidance_kind = "cfg"
    positions = "none"
    latent_multiple = 1
    vae = "AutoencoderDC"
    vae_engine = "halo"
    controlnet_class = "SanaControlNetModel"
    default_native = 1024
    default_steps = 20
    default_guidance = 4.5

    def describe(self, source: ModelSource) -> ModelInfo:
        transformer = source.config("transformer")
        blocks = source.config("vae").get("encoder_block_out_channels") or [0] * 6
        factor = 2 ** (len(blocks) - 1)
        sample = transformer.get("sample_size")
        return self.base_info(
            source,
            latent_channels=int(transformer.get("in_channels", 32)),
            vae_scale_factor=factor,
            latent_multiple=int(transformer.get("patch_size", 1)),
            native_size=int(sample) * factor if sample else self.default_native,
            shift_rule=flow_shift_rule(source),
        )

    def adapt(self, pipe: Any, info: ModelInfo) -> Backend:
        return SanaBackend(pipe, info)
