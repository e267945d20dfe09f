"""Qwen-Image: a flow-matching MMDiT over 2x2-packed latents of its own causal 3D VAE, Qwen2.5-VL prompts.

- **Prompts**: the last hidden states of Qwen2.5-VL over Qwen-Image's chat template, its system prefix dropped,
  through the pipeline's own `encode_prompt` (with its attention mask when the prompts' lengths differ).
- **Guidance**: "true" classifier-free guidance with a negative prompt (`--guidance` is the pipeline's
  `true_cfg_scale`, 4 by default; off at 1 or below), two passes, then the pipeline's rescale: each token's
  guided velocity is scaled back to the norm of its conditional one. Per token, so per tile.
- **Packing**: as FLUX.1 (gigadiff.backends.flow.pack), noise drawn unpacked ([B, 1, C, H, W] in the pipeline
  holds the same numbers).
- **ControlNets** (`--control`, QwenImageControlNetModel): as FLUX.1's InstantX-style nets (gigadiff.backends.flux):
  the image VAE-encoded with the run's generator before the noise, each tile the packed crop of its latents, the
  prompt given to the nets in both guidance passes, as its pipeline does.
- **Positions**: rotary, centred: a tile's image positions run from -h/2 to h/2 around its centre, and the text
  positions follow the image's largest index. That is what the transformer builds by itself for every tile
  (local positions). `--positions global` gives every tile its place around the CANVAS centre, and the text
  positions follow the canvas's; the transformer takes one set per call, so tiles then run one per call.
- **VAE**: AutoencoderKLQwenImage (causal 3D convolutions over one frame, per-pixel RMS norms, one single-head
  attention at latent resolution in each direction), tiled by gigadiff.vae.halo: no image-wide statistics, so
  tiles with a halo of the network's reach are exact, and the attention attends to every position's keys
  (exact mode) or to keys pooled over the whole image (fast mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from gigadiff.backends.adapter import NegativeGuided, TransformerBackend
from gigadiff.backends.control import Control, encoded_controls, pipeline_processor, run_controls, summed_residuals
from gigadiff.backends.family import Family, Preset, flow_shift_rule
from gigadiff.backends.flow import pack, unpack
from gigadiff.lazy import no_grad, torch
from gigadiff.overrides import instance_override

if TYPE_CHECKING:
    import torch as torch_types

    from gigadiff.backends.base import Backend
    from gigadiff.backends.source import ModelSource
    from gigadiff.facts import ModelInfo
    from gigadiff.geometry import Tile
    from gigadiff.vae.halo import Network

Text = tuple["torch_types.Tensor", "torch_types.Tensor | None"]
"""A prompt's hidden states and attention mask (None: every token counts)."""


@dataclass(frozen=True)
class QwenImageConditioning(NegativeGuided):
    text: Text
    negative: Text | None
    scale: float
    canvas_tokens: tuple[int, int] | None
    """(rows, columns) of the canvas in tokens with global positions; None: tile-local positions."""
    controls: tuple[Control, ...] = ()


def centred_rope(embed: Any, canvas: tuple[int, int], corner: tuple[int, int], shape: tuple[int, int],
                 text_len: int, device: Any) -> tuple[Any, Any]:  # fmt: skip
    """The rotary frequencies of a tile of `shape` tokens at `corner` on a canvas of `canvas` tokens, in
    Qwen-Image's centred convention taken over the canvas (positions -(H - H//2) .. H//2 - 1 on each axis,
    frame 0), and of the text after the canvas's largest index: (image [h*w, D], text [text_len, D])."""
    (rows_c, cols_c), (top, left), (h, w) = canvas, corner, shape
    frame_dim, row_dim, col_dim = embed.axes_dim
    rows = torch.arange(h) + top - (rows_c - rows_c // 2)
    cols = torch.arange(w) + left - (cols_c - cols_c // 2)
    frame = embed.rope_params(torch.zeros(1, dtype=torch.long), frame_dim, embed.theta)
    image = torch.cat(
        [
            frame.view(1, 1, -1).expand(h, w, -1),
            embed.rope_params(rows, row_dim, embed.theta).view(h, 1, -1).expand(h, w, -1),
            embed.rope_params(cols, col_dim, embed.theta).view(1, w, -1).expand(h, w, -1),
        ],
        dim=-1,
    ).reshape(h * w, -1)
    start = max(rows_c // 2, cols_c // 2)
    index = torch.arange(start, start + text_len)
    text = torch.cat([embed.rope_params(index, d, embed.theta) for d in embed.axes_dim], dim=1)
    return image.to(device), text.to(device)


def _canvas_positions(embed: Any, canvas: tuple[int, int], corner: tuple[int, int],
                      shape: tuple[int, int]) -> contextlib.AbstractContextManager[Any]:  # fmt: skip
    """`embed` (a QwenEmbedRope) giving a tile of `shape` tokens at `corner` its place on the canvas."""

    def positions(video_fhw: Any, device: Any = None, max_txt_seq_len: Any = None) -> Any:
        return centred_rope(embed, canvas, corner, shape, int(max_txt_seq_len), device)

    return instance_override(embed, "forward", positions)


class QwenImageBackend(TransformerBackend):
    def vae_networks(self) -> tuple[Network, Network]:
        return qwen_vae_networks(self.pipe.vae)

    @no_grad
    def condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> QwenImageConditioning:  # fmt: skip
        scale = 0.0 if guidance is None else guidance
        prompting = self.prompt_options()
        text = self.pipe.encode_prompt(prompt=prompt, device=self.device, **prompting)
        negative = None
        if self.info.runs_cfg(scale, negative_prompt):  # only with a negative prompt, as its pipeline
            negative = self.pipe.encode_prompt(prompt=negative_prompt, device=self.device, **prompting)
        token_px = self.info.vae_scale_factor * self.info.latent_multiple
        canvas = None
        if options.get("positions") == "global":  # (rows, columns) of the canvas in tokens
            canvas = (canvas_px[0] // token_px, canvas_px[1] // token_px)
        processor = partial(pipeline_processor, self.info.vae_scale_factor)
        controls = run_controls(options, self.controlnets, processor, canvas_px, self.device, self.dtype)
        return QwenImageConditioning(tuple(text), None if negative is None else tuple(negative), scale, canvas,
                                     controls)  # fmt: skip

    def drawn_conditioning(self, cond: QwenImageConditioning, generator: Any, tiling: Any,
                           listener: Any = None) -> Any:  # fmt: skip
        """The ControlNets' images encoded (tiled), a posterior sample drawn with `generator`, as its pipeline."""
        if not cond.controls:
            return cond
        controls = encoded_controls(cond.controls, lambda c: True, self.codec, generator, tiling, listener, self.dtype)
        return replace(cond, controls=controls)

    def planned_condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> QwenImageConditioning:  # fmt: skip
        """Its encoder trims each prompt to its mask's length, which `meta` tensors do not have: hidden states of
        the prompt's token count (at most the pipeline's limit), every token counting."""
        limit = self.prompt_options().get("max_sequence_length", 512)
        width = self.transformer.config.joint_attention_dim

        def text(words: str) -> Text:
            tokens = min(limit, len(self.pipe.tokenizer(words).input_ids))
            return torch.empty(1, tokens, width, device=self.device, dtype=self.dtype), None

        scale = 0.0 if guidance is None else guidance
        negative = text(negative_prompt) if self.info.runs_cfg(scale, negative_prompt) else None
        token_px = self.info.vae_scale_factor * self.info.latent_multiple
        canvas = (canvas_px[0] // token_px, canvas_px[1] // token_px) if options.get("positions") == "global" else None
        return QwenImageConditioning(text(prompt), negative, scale, canvas)

    def branch_inputs(self, cond: QwenImageConditioning, branch: int, tiles: Sequence[Tile]) -> Any:
        """A pass's hidden states and attention mask (None: every token counts), per tile."""
        text = cond.text if branch else cond.negative
        assert text is not None
        embeds, mask = text
        n = len(tiles)
        return embeds.expand(n, -1, -1), None if mask is None else mask.expand(n, -1)

    def batches(self, cond: QwenImageConditioning) -> bool:
        return False  # its pipeline runs the two passes as calls of their own

    def one_call_per_tile(self, cond: QwenImageConditioning) -> bool:
        return cond.canvas_tokens is not None  # the transformer takes one set of positions per call

    def run(self, x: torch_types.Tensor, t: Any, cond: QwenImageConditioning, tiles: Sequence[Tile],
            inputs: Any) -> torch_types.Tensor:  # fmt: skip
        """The transformer's velocity for tiles x [N, C, h, w] (packed, run, unpacked)."""
        n, _, h, w = x.shape
        embeds, mask = inputs
        timestep = torch.as_tensor(t, device=self.device, dtype=torch.float32).expand(n)
        shapes = [[(1, h // 2, w // 2)]] * n
        hidden = pack(x.to(self.device, self.transformer.dtype))
        with contextlib.ExitStack() as stack:
            canvas = cond.canvas_tokens
            if canvas is not None:  # the transformer's positions, and its ControlNets'
                corner = (tiles[0].y // 2, tiles[0].x // 2)
                for model in (self.transformer, *(c.model for c in cond.controls)):
                    stack.enter_context(_canvas_positions(model.pos_embed, canvas, corner, (h // 2, w // 2)))
            blocks = self.pass_shared(hidden, t, tiles, cond.controls, lambda rows, part: self.control_residuals(
                rows, t, timestep[: len(part)], cond, part, shapes[: len(part)]))  # fmt: skip
            out = self.transformer(
                hidden_states=hidden,
                timestep=timestep / 1000,
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                img_shapes=shapes,
                controlnet_block_samples=blocks,
                return_dict=False,
            )[0]
        return unpack(out.float(), h, w)

    def control_residuals(self, hidden: torch_types.Tensor, t: Any, timestep: torch_types.Tensor,
                          cond: QwenImageConditioning, tiles: Sequence[Tile], shapes: Any) -> Any:  # fmt: skip
        """The block residuals of the ControlNets acting at this step (summed), each fed the packed crops of its
        image's latents under the tiles, with the prompt (the pipeline gives its nets the prompt in both
        guidance passes: `run` computes them once for both); None when none acts."""
        n = hidden.shape[0]
        embeds, mask = cond.text
        blocks: Any = None
        for control in self.acting(cond.controls, t):
            residuals = control.model(hidden_states=hidden, controlnet_cond=pack(control.crops(tiles, 1)),
                                      conditioning_scale=control.scale, timestep=timestep / 1000,
                                      encoder_hidden_states=embeds.expand(n, -1, -1),
                                      encoder_hidden_states_mask=None if mask is None else mask.expand(n, -1),
                                      img_shapes=shapes, return_dict=False)  # fmt: skip
            blocks = summed_residuals(blocks, residuals)
        return blocks

    def combine(self, uncond: torch_types.Tensor, cond_out: torch_types.Tensor,
                cond: QwenImageConditioning) -> torch_types.Tensor:  # fmt: skip
        """Guidance, then each token's (2x2 latent px, all channels) velocity rescaled to its conditional norm."""
        guided = pack(super().combine(uncond, cond_out, cond))
        conditional = pack(cond_out)
        rescaled = guided * (conditional.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return unpack(rescaled, *cond_out.shape[-2:])


def _qwen_attention_op(block: Any, scale: float) -> Any:
    """The single-head softmax attention of a Qwen-Image VAE mid-block as a tiled-pass op."""
    from gigadiff.vae.passes import SoftmaxAttention

    class QwenVaeAttention(SoftmaxAttention):
        def qkv(self, x: Any) -> tuple[Any, Any, Any]:
            b, c, t, h, w = x.shape
            planes = block.norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
            qkv = block.to_qkv(planes).reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2)
            q, k, v = qkv.chunk(3, dim=-1)
            return q.contiguous(), k.contiguous(), v.contiguous()

        def finish(self, x: Any, attended: Any) -> Any:
            b, c, t, h, w = x.shape
            out = block.proj(attended.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
            return out.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + x

    return QwenVaeAttention(scale, max_keys=None)


def qwen_vae_networks(vae: Any) -> tuple[Network, Network]:
    """AutoencoderKLQwenImage as (decoder, encoder) networks over single-frame images: each direction's mid-block
    attention is its whole-image op (at latent resolution)."""
    from gigadiff.vae.halo import Network, architecture

    factor = 2 ** len(vae.config.temperal_downsample)

    def hooked(blocks: Sequence[Any], ops: Sequence[Any]) -> Any:
        @contextlib.contextmanager
        def install() -> Any:
            with contextlib.ExitStack() as stack:
                for block, op in zip(blocks, ops, strict=True):
                    plain = type(block).forward.__get__(block)
                    stack.enter_context(instance_override(block, "forward", lambda x, op=op, plain=plain: op(x, plain)))
                yield

        return install

    def limit(ops: Sequence[Any]) -> Any:
        def set_keys(keys: int | None) -> None:
            for op in ops:
                op.max_keys = keys

        return set_keys

    def decode(z: Any) -> Any:
        return vae.decoder(vae.post_quant_conv(z[:, :, None]))[:, :, 0]

    def encode(x: Any) -> Any:
        return vae.quant_conv(vae.encoder(x[:, :, None]))[:, :, 0]

    dec_blocks, enc_blocks = list(vae.decoder.mid_block.attentions), list(vae.encoder.mid_block.attentions)
    dec_ops = [_qwen_attention_op(b, 1.0) for b in dec_blocks]
    enc_ops = [_qwen_attention_op(b, 1.0 / factor) for b in enc_blocks]
    decoder = Network(decode, dec_ops, hooked(dec_blocks, dec_ops), int(vae.config.z_dim), float(factor),
                      architecture=architecture(vae, "decoder"), fast_keys=limit(dec_ops),
                      stages=[vae.decoder.mid_block, *vae.decoder.up_blocks], module=vae.decoder)  # fmt: skip
    encoder = Network(encode, enc_ops, hooked(enc_blocks, enc_ops), 3, 1.0 / factor, align=factor, posterior=True,
                      architecture=architecture(vae, "encoder"), fast_keys=limit(enc_ops),
                      stages=list(vae.encoder.down_blocks), module=vae.encoder)  # fmt: skip
    return decoder, encoder


class QwenImage(Family):
    name = "qwen-image"
    attention_backends = True
    fp16_risk = "Qwen-Image's activations overflow fp16 (its pipeline runs in bf16)"
    pipelines = ("QwenImagePipeline",)
    presets = (Preset("qwen-image", "Qwen/Qwen-Image", steps=50, guidance=4.0, native_size=1328),)
    scheduler_kind = "flow"
    guidance_kind = "cfg"
    negative_required = True  # its pipeline guides only with a negative prompt
    controlnet_class = "QwenImageControlNetModel"
    positions = "rope"
    latent_multiple = 2
    vae = "AutoencoderKLQwenImage"
    vae_engine = "halo"
    default_native = 1328
    default_steps = 50
    default_guidance = 4.0

    def describe(self, source: ModelSource) -> ModelInfo:
        transformer = source.config("transformer")
        downsample = source.config("vae").get("temperal_downsample") or [False, True, True]
        return self.base_info(
            source,
            latent_channels=int(transformer.get("in_channels", 64)) // 4,
            vae_scale_factor=2 ** len(downsample),
            latent_multiple=int(transformer.get("patch_size", 2)),
            shift_rule=flow_shift_rule(source),
        )

    def adapt(self, pipe: Any, info: ModelInfo) -> Backend:
        return QwenImageBackend(pipe, info)
