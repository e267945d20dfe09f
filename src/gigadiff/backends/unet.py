"""The adapter of the UNet families (Stable Diffusion 1.x/2.x, epsilon and v-prediction, and SDXL).

Prompt encoding is the pipeline's own `encode_prompt` (so textual inversions, clip skip, LoRA scales and the
SDXL zero-negative convention behave as in diffusers). Classifier-free guidance runs inside `predict` with the
unconditional and conditional halves in one UNet batch, ordered [uncond..., cond...] as diffusers does.
LCM-distilled UNets (time_cond_proj_dim) take the guidance scale as an embedding instead, in one pass.

SDXL micro-conditioning: each tile is presented as a crop of the full canvas, i.e. original_size = canvas size,
crops_coords_top_left = the tile's position, target_size = the tile size (all in image pixels). On a canvas
that fits in one tile this is exactly diffusers' default conditioning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from gigadiff.backends.adapter import DiffusersBackend
from gigadiff.backends.control import Control, run_controls, summed_residuals, unet_processor
from gigadiff.facts import ModelInfo
from gigadiff.lazy import no_grad, torch

if TYPE_CHECKING:
    import torch as torch_types

    from gigadiff.geometry import Tile


@dataclass(frozen=True)
class UNetConditioning:
    prompt_embeds: torch_types.Tensor
    negative_embeds: torch_types.Tensor | None
    pooled: torch_types.Tensor | None
    negative_pooled: torch_types.Tensor | None
    scale: float
    guidance_rescale: float
    canvas_px: tuple[int, int]
    timestep_cond: torch_types.Tensor | None
    controls: tuple[Control, ...] = ()
    guess_mode: bool = False
    """ControlNets on the prompted pass only, scaled up from the shallowest block (the pipelines' guess_mode, also
    forced by a net whose config pools its conditions, as the pipelines force it)."""

    @property
    def cfg(self) -> bool:
        return self.negative_embeds is not None


def _scattered(values: torch_types.Tensor, rows: list[int], n: int) -> torch_types.Tensor:
    """[n, ...] zeros with `values` ([len(rows), ...]) at `rows`."""
    out = values.new_zeros((n, *values.shape[1:]))
    out[rows] = values
    return out


def rescale_guidance(guided: torch_types.Tensor, cond: torch_types.Tensor, factor: float) -> torch_types.Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4), per tile: match the std of the conditional prediction."""
    dims = list(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return factor * rescaled + (1 - factor) * guided


class UNetBackend(DiffusersBackend):
    """Wraps a loaded StableDiffusion(XL)Pipeline (or any pipeline with the same components)."""

    def __init__(self, pipe: Any, info: ModelInfo, sdxl: bool):
        super().__init__(pipe, info, pipe.unet)
        self.unet = pipe.unet
        self.sdxl = sdxl

    @no_grad
    def condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> UNetConditioning:  # fmt: skip
        scale = 0.0 if guidance is None else guidance
        guidance_embedded = self.unet.config.time_cond_proj_dim is not None
        cfg = self.info.runs_cfg(scale, negative_prompt) and not guidance_embedded
        negative = negative_prompt or None
        pooled = negative_pooled = None
        if self.sdxl:
            embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
                prompt=prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                negative_prompt=negative,
            )  # fmt: skip
        else:
            embeds, negative_embeds = self.pipe.encode_prompt(prompt, self.device, 1, cfg, negative_prompt=negative)
        timestep_cond = None
        if guidance_embedded:
            w = torch.tensor([scale - 1.0])
            timestep_cond = self.pipe.get_guidance_scale_embedding(
                w, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(self.device, self.dtype)
        processor = partial(unet_processor, self.info.vae_scale_factor)
        controls = run_controls(options, self.controlnets, processor, canvas_px, self.device, self.dtype)
        pooled_conditions = bool(controls) and bool(controls[0].model.config.get("global_pool_conditions"))
        return UNetConditioning(
            controls=controls,
            guess_mode=bool(options.get("guess_mode")) or pooled_conditions,
            prompt_embeds=embeds,
            negative_embeds=negative_embeds if cfg else None,
            pooled=pooled,
            negative_pooled=negative_pooled if cfg else None,
            scale=scale,
            guidance_rescale=float(options.get("guidance_rescale", 0.0)),
            canvas_px=canvas_px,
            timestep_cond=timestep_cond,
        )

    def time_ids(self, tiles: Sequence[Tile], cond: UNetConditioning) -> torch_types.Tensor:
        f = self.info.vae_scale_factor
        rows = [[*cond.canvas_px, t.y * f, t.x * f, t.h * f, t.w * f] for t in tiles]
        return torch.tensor(rows, dtype=cond.prompt_embeds.dtype, device=self.device)

    def branch_inputs(self, cond: UNetConditioning, branch: int, tiles: Sequence[Tile]) -> Any:
        """Text embeddings and SDXL's added conditioning (pooled text, each tile's crop time ids) of one pass."""
        n = len(tiles)
        embeds = cond.prompt_embeds if branch else cond.negative_embeds
        assert embeds is not None
        added = None
        if self.sdxl:
            pooled = cond.pooled if branch else cond.negative_pooled
            assert pooled is not None
            added = {"text_embeds": pooled.expand(n, -1), "time_ids": self.time_ids(tiles, cond)}
        timestep_cond = None if cond.timestep_cond is None else cond.timestep_cond.expand(n, -1)
        prompted = torch.full((n,), branch == 1, dtype=torch.bool, device=self.device)
        return embeds.expand(n, -1, -1), added, timestep_cond, prompted

    def run(self, x: torch_types.Tensor, t: Any, cond: UNetConditioning, tiles: Sequence[Tile],
            inputs: Any) -> torch_types.Tensor:  # fmt: skip
        embeds, added, timestep_cond, prompted = inputs
        x = x.to(self.device, self.dtype)
        down, mid = self.control_residuals(x, t, cond, tiles, embeds, added, prompted)
        return self.unet(x, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond, added_cond_kwargs=added,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=False)[0].float()  # fmt: skip

    def control_residuals(self, x: torch_types.Tensor, t: Any, cond: UNetConditioning, tiles: Sequence[Tile],
                          embeds: torch_types.Tensor, added: Any,
                          prompted: torch_types.Tensor) -> tuple[Any, Any]:  # fmt: skip
        """The residuals the run's ControlNets acting at `t` add to the UNet's blocks, each fed its tiles' crops of
        its image (summed over ControlNets, as MultiControlNet does); (None, None) when none acts. In guess mode
        the nets see only the rows of the prompted pass (`prompted`), and the other rows get no residual."""
        acting = self.acting(cond.controls, t)
        if not acting:
            return None, None
        rows = prompted.nonzero().flatten().tolist() if cond.guess_mode else list(range(len(tiles)))
        if not rows:
            return None, None
        subset = len(rows) < len(tiles)
        if subset:
            x, embeds = x[rows], embeds[rows]
            added = None if added is None else {k: v[rows] for k, v in added.items()}
        down: list[torch_types.Tensor] | None = None
        mid: torch_types.Tensor | None = None
        for control in acting:
            crops: Any = control.crops([tiles[i] for i in rows], self.info.vae_scale_factor)
            union: dict[str, Any] = {}
            if control.mode is not None:  # a union net: its image in a list, its kind one-hot per row
                kinds = torch.zeros(len(rows), control.model.config.num_control_type, device=self.device,
                                    dtype=x.dtype)  # fmt: skip
                kinds[:, control.mode] = 1
                crops, union = [crops], {"control_type": kinds, "control_type_idx": [control.mode]}
            d, m = control.model(x, t, encoder_hidden_states=embeds, controlnet_cond=crops,
                                 conditioning_scale=control.scale, guess_mode=cond.guess_mode,
                                 added_cond_kwargs=added, return_dict=False, **union)  # fmt: skip
            down, mid = summed_residuals(down, d), summed_residuals(mid, m)
        if subset and down is not None and mid is not None:  # the unprompted rows: zeros, as the pipelines give
            down = [_scattered(r, rows, len(tiles)) for r in down]
            mid = _scattered(mid, rows, len(tiles))
        return down, mid

    def combine(self, uncond: torch_types.Tensor, cond_out: torch_types.Tensor,
                cond: UNetConditioning) -> torch_types.Tensor:  # fmt: skip
        """Classifier-free guidance from the two halves (with guidance rescale when asked)."""
        out = uncond + cond.scale * (cond_out - uncond)
        if cond.guidance_rescale > 0:
            out = rescale_guidance(out, cond_out, cond.guidance_rescale)
        return out
