"""Z-Image (Turbo): a single-stream flow-matching DiT over 2x2 patches of the 16-channel FLUX VAE's latents.

- **Prompts**: the second-to-last hidden states of a Qwen3 text encoder over the chat-formatted prompt (its
  padding removed), through the pipeline's own `encode_prompt`.
- **Guidance**: classifier-free with a negative prompt, in Z-Image's own form: cond + scale x (cond - uncond),
  on whenever the scale is above 0 (Turbo runs without it). The transformer predicts the negated velocity.
- **Schedule**: sigmas spaced linearly from 1 to 1/steps in float32 (as its pipeline), shifted by the
  scheduler's fixed shift or by mu (gigadiff.backends.flow).
- **Positions**: the transformer builds its 3-axis RoPE ids itself, (caption length + 1, row, col) for image
  tokens. Tile-local by default. With `--positions global` every tile's rows and columns are offset by its
  place on the canvas, up to the transformer's precomputed rotary table (axes_lens: 512 tokens, 8192 px, for
  the released model).
- **ControlNets** (`--control`, ZImageControlNetModel, which shares the transformer's embedders and refiners as
  ZImageControlNetPipeline makes it): the control image is resized to the canvas as that pipeline resizes it,
  VAE-encoded (tiled, the posterior's mode, as the pipeline takes it) once per run and zero-padded to the net's
  `control_in_dim` channels; each tile's net reads the crop of those latents with the pass's caption, its
  positions offset as the transformer's with `--positions global`; its block samples join the transformer's
  layers. The pipeline takes no schedule window: a START:END is gigadiff's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from gigadiff.backends.adapter import NegativeGuided, TransformerBackend
from gigadiff.backends.control import Control, encoded_controls, pipeline_processor, run_controls, summed_residuals
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
class ZImageConditioning(NegativeGuided):
    embeds: list[torch_types.Tensor]
    negative: list[torch_types.Tensor] | None
    scale: float
    global_positions: bool
    controls: tuple[Control, ...] = ()


def offset_positions(
    transformer: Any, offsets: Sequence[tuple[int, int]], patch: int
) -> contextlib.AbstractContextManager[None]:
    """While inside, the transformer's image position ids of batch item i are offset by offsets[i] (rows,
    columns, in tokens): it builds them itself from the tile's shape, from 0."""
    build = transformer.patchify_and_embed

    def patched(images: list[Any], captions: list[Any], patch_size: int, f_patch_size: int) -> Any:
        out = list(build(images, captions, patch_size, f_patch_size))
        ids = out[3]
        for i, (dy, dx) in enumerate(offsets):
            _, _, h, w = images[i].shape
            n = (h // patch) * (w // patch)  # the image's own tokens; padding ids follow
            ids[i] = ids[i].clone()
            ids[i][:n, 1] += dy
            ids[i][:n, 2] += dx
        return tuple(out)

    return instance_override(transformer, "patchify_and_embed", patched)


class ZImageBackend(TransformerBackend):
    def __init__(self, pipe: Any, info: ModelInfo):
        super().__init__(pipe, info)
        self.patch = info.latent_multiple

    always_sigmas = True

    def default_sigmas(self, steps: int) -> list[float]:
        return torch.linspace(1.0, 1 / steps, steps).tolist()

    @no_grad
    def condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> ZImageConditioning:  # fmt: skip
        scale = 0.0 if guidance is None else guidance
        cfg = self.info.runs_cfg(scale, negative_prompt)
        embeds, negative = self.pipe.encode_prompt(prompt=prompt, device=self.device, do_classifier_free_guidance=cfg,
                                                   negative_prompt=negative_prompt or None,
                                                   **self.prompt_options())  # fmt: skip
        processor = partial(pipeline_processor, self.info.vae_scale_factor)
        controls = run_controls(options, self.controlnets, processor, canvas_px, self.device, self.dtype)
        return ZImageConditioning(embeds, negative if cfg else None, scale, options.get("positions") == "global",
                                  controls)  # fmt: skip

    def add_controlnets(self, models: Mapping[str, Any]) -> None:
        """Each net shares the transformer's embedders and refiners, as ZImageControlNetPipeline makes it."""
        for model in models.values():
            type(model).from_transformer(model, self.transformer)
        super().add_controlnets(models)

    def drawn_conditioning(self, cond: ZImageConditioning, generator: Any, tiling: Any, listener: Any = None) -> Any:
        """The control images VAE-encoded (tiled; the posterior's mode, drawing nothing) and zero-padded to each
        net's `control_in_dim` channels (its version 2.0 reads more channels than the latents have)."""
        if not cond.controls:
            return cond
        encoded = encoded_controls(cond.controls, lambda c: True, self.codec, None, tiling, listener, self.dtype)
        controls = tuple(replace(c, image=_padded(c.image, int(c.model.config.control_in_dim))) for c in encoded)
        return replace(cond, controls=controls)

    def planned_condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> ZImageConditioning:  # fmt: skip
        """Its encoder keeps each prompt's tokens by its mask, which `meta` tensors do not have: caption features of
        the prompt's token count (at most the pipeline's limit)."""
        scale = 0.0 if guidance is None else guidance
        limit = self.prompt_options().get("max_sequence_length", 512)
        width = self.transformer.config.cap_feat_dim

        def caption(words: str) -> list[torch_types.Tensor]:
            tokens = max(1, min(limit, len(self.pipe.tokenizer(words).input_ids)))
            return [torch.empty(tokens, width, device=self.device, dtype=self.dtype)]

        negative = caption(negative_prompt) if self.info.runs_cfg(scale, negative_prompt) else None
        return ZImageConditioning(caption(prompt), negative, scale, options.get("positions") == "global")

    guidance_order = (1, 0)  # its pipeline batches [cond..., uncond...]

    def branch_inputs(self, cond: ZImageConditioning, branch: int, tiles: Sequence[Tile]) -> Any:
        """A pass's caption embeddings, one per tile (the transformer takes a list)."""
        captions = cond.embeds if branch else cond.negative
        assert captions is not None
        return captions * len(tiles)

    def run(self, x: torch_types.Tensor, t: Any, cond: ZImageConditioning, tiles: Sequence[Tile],
            inputs: Any) -> torch_types.Tensor:  # fmt: skip
        """The velocity for tiles x [N, C, h, w] (the transformer's output, negated as its pipeline does)."""
        n = x.shape[0]
        timestep = (1000 - torch.as_tensor(t, device=self.device).expand(n)) / 1000
        images = list(x.to(self.device, self.transformer.dtype).unsqueeze(2).unbind(dim=0))
        offsets = [(t_.y // self.patch, t_.x // self.patch) for t_ in tiles]
        with contextlib.ExitStack() as stack:
            if cond.global_positions:  # the transformer's positions and each ControlNet's
                for model in (self.transformer, *(c.model for c in cond.controls)):
                    stack.enter_context(offset_positions(model, offsets, self.patch))
            blocks: Any = None
            for control in self.acting(cond.controls, t):
                crops = list(control.crops(tiles, 1).unsqueeze(2).unbind(dim=0))
                blocks = summed_residuals(blocks, control.model(images, timestep, inputs, crops,
                                                                conditioning_scale=control.scale))  # fmt: skip
            out = self.transformer(images, timestep, inputs, controlnet_block_samples=blocks, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    def combine(self, uncond: torch_types.Tensor, cond_out: torch_types.Tensor,
                cond: ZImageConditioning) -> torch_types.Tensor:  # fmt: skip
        """Z-Image's guidance: cond + scale x (cond - uncond)."""
        return cond_out + cond.scale * (cond_out - uncond)


def _padded(latents: torch_types.Tensor, channels: int) -> torch_types.Tensor:
    """[1, C, H, W] latents with zero channels up to `channels`."""
    if latents.shape[1] >= channels:
        return latents
    extra = latents.new_zeros((latents.shape[0], channels - latents.shape[1], *latents.shape[2:]))
    return torch.cat([latents, extra], dim=1)


class ZImage(Family):
    name = "z-image"
    attention_backends = True
    pipelines = ("ZImagePipeline",)
    single_file_markers = ("noise_refiner.", "model.diffusion_model.noise_refiner.")
    single_file_pipeline = "ZImagePipeline"
    presets = (Preset("z-image-turbo", "Tongyi-MAI/Z-Image-Turbo", steps=9, guidance=0.0),)
    scheduler_kind = "flow"
    guidance_kind = "cfg"
    cfg_above = 0.0  # its pipeline guides at any scale above 0
    positions = "rope"
    latent_multiple = 2
    controlnet_class = "ZImageControlNetModel"
    default_native = 1024
    default_steps = 50
    default_guidance = 5.0

    def describe(self, source: ModelSource) -> ModelInfo:
        transformer = source.config("transformer")
        patch = int((transformer.get("all_patch_size") or [2])[0])
        factor = vae_factor(source)
        axes = transformer.get("axes_lens") or [1024, 512, 512]
        return self.base_info(
            source,
            latent_channels=int(transformer.get("in_channels", 16)),
            vae_scale_factor=factor,
            latent_multiple=patch,
            shift_rule=flow_shift_rule(source),
            max_global_px=min(int(axes[1]), int(axes[2])) * patch * factor,
        )

    def adapt(self, pipe: Any, info: ModelInfo) -> Backend:
        return ZImageBackend(pipe, info)
