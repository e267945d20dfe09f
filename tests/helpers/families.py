"""Every registered model family, declared for the contract suite (tests/test_families.py): its tiny pipeline,
how its diffusers pipeline is called for the same image, and the refusals it owes before any weights load.

A new family's tests are its entry here (and its tiny factory in tests/helpers/tiny.py): the suite runs every
check on every case, and fails when a registered family has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tests.helpers import tiny

SIZE = 256
"""The one-tile canvas of every case (image px): a tile of every tiny model."""
STEPS = 3
PROMPT = "a red lighthouse"


def identity(latents: torch.Tensor, result: Any) -> torch.Tensor:
    return latents


def unpacked(latents: torch.Tensor, result: Any) -> torch.Tensor:
    """FLUX.1's and Qwen-Image's packed tokens [1, N, 4C] as the canvas [1, C, H, W]."""
    from gigadiff.backends.flow import unpack

    h, w = result.latents.shape[-2:]
    return unpack(latents, h, w)


def flux2_canvas(latents: torch.Tensor, result: Any) -> torch.Tensor:
    """FLUX.2 [dev]'s tokens of its patchified canvas [1, N, C] as the canvas [1, C, H, W]."""
    h, w = result.latents.shape[-2:]
    return latents.permute(0, 2, 1).reshape(1, -1, h, w)


def klein_vae_latents(latents: torch.Tensor, result: Any) -> torch.Tensor:
    """FLUX.2 [klein]'s pipeline returns the VAE's own latents: ours are mapped to them to compare."""
    return latents


@dataclass(frozen=True)
class Case:
    """One family, as the contract suite runs it."""

    family: str
    """Its registered name (gigadiff.backends.registry)."""
    build: Callable[[], Any] | None
    """Its tiny pipeline (tests/helpers/tiny.py); None for a model that is not a diffusers pipeline."""
    ours: dict[str, Any] = field(default_factory=dict)
    """gigadiff's options for the compared image (guidance, negative prompt)."""
    theirs: dict[str, Any] = field(default_factory=dict)
    """The diffusers pipeline's keyword arguments for the same image."""
    schedulers: tuple[str, str] = ("default", "dpmpp_2m")
    """The model's own scheduler and a multistep solver."""
    to_canvas: Callable[[torch.Tensor, Any], torch.Tensor] = identity
    """The pipeline's latents as gigadiff's canvas (given gigadiff's result)."""
    canvas_to_theirs: bool = False
    """Compare ours mapped to the pipeline's space (the codec's `to_vae`) instead."""
    pipeline_sigmas: bool = False
    """The pipeline is given the family's sigma schedule as an array (Z-Image: its own list breaks UniPC)."""
    tolerance: float = 1e-4
    """Largest difference from the fp32 pipeline, relative to the latents' scale where they exceed 1."""
    single_file_keys: tuple[str, ...] = ()
    """Tensor names of a single-file checkpoint of the family (detection from the file's header)."""
    refusals: tuple[tuple[tuple[str, ...], str], ...] = ()
    """(generate's arguments, a message) refused before any weights load."""
    facts: dict[str, Any] = field(default_factory=dict)
    """What find_model must read from the saved folder's config files (ModelInfo fields)."""
    img2img: str = ""
    """The diffusers img2img pipeline of the family, where there is one (built from the same components)."""
    placed: str = ""
    """Why a tile's prediction depends on where the tile is, when it does (then rolling a wrapped canvas does not
    roll the prediction)."""


CFG = {"guidance": 5.0, "negative": "fog"}
CFG_THEIRS = {"guidance_scale": 5.0, "negative_prompt": "fog"}
NOT_A_TOKEN = (("--size", "264x256"), "--size: width 264 is not a multiple of 16")
NO_DDIM = (("--scheduler", "ddim"), "--scheduler 'ddim' has no flow-matching form")

CASES: dict[str, Case] = {
    case.family: case
    for case in (
        Case("sd", tiny.tiny_sd_pipeline, CFG, CFG_THEIRS, img2img="StableDiffusionImg2ImgPipeline",
             single_file_keys=("model.diffusion_model.input_blocks.0",),
             refusals=((("--size", "260x256"), "--size: width 260 is not a multiple of 8"),
                       (("--positions", "global"), "has no position ids")),
             facts={"vae_scale_factor": 8, "latent_multiple": 1, "scheduler_kind": "ddpm", "guidance_kind": "cfg"}),
        Case("sdxl", tiny.tiny_sdxl_pipeline, CFG, CFG_THEIRS, img2img="StableDiffusionXLImg2ImgPipeline",
             single_file_keys=("conditioner.embedders.1.model.ln_final.weight",),
             placed="its micro-conditioning tells each tile its crop's place on the canvas",
             refusals=((("--true-cfg", "2"), "its guidance is classifier-free already"),),
             facts={"vae_scale_factor": 8, "latent_multiple": 1, "scheduler_kind": "ddpm", "guidance_kind": "cfg"}),
        Case("flux", tiny.tiny_flux_pipeline, {"guidance": 3.5}, {"guidance_scale": 3.5}, to_canvas=unpacked,
             img2img="FluxImg2ImgPipeline",
             single_file_keys=("double_blocks.0.img_attn.qkv.weight",), refusals=(NOT_A_TOKEN, NO_DDIM),
             facts={"vae_scale_factor": 8, "latent_multiple": 2, "scheduler_kind": "flow",
                    "guidance_kind": "embedded", "true_cfg": True}),
        Case("flux2", tiny.tiny_flux2_pipeline, {"guidance": 4.0}, {"guidance_scale": 4.0}, to_canvas=flux2_canvas,
             single_file_keys=("double_blocks.0.x", "double_stream_modulation_img.lin.weight"),
             refusals=((("--size", "264x256"), "--size: width 264 is not a multiple of 16"), NO_DDIM),
             facts={"vae_scale_factor": 16, "latent_multiple": 1, "latent_channels": 32, "scheduler_kind": "flow",
                    "guidance_kind": "embedded"}),
        Case("flux2-klein", tiny.tiny_flux2_klein_pipeline, {"guidance": 4.0}, {"guidance_scale": 4.0},
             canvas_to_theirs=True, refusals=(NO_DDIM, (("--true-cfg", "2"), "--true-cfg is for models")),
             facts={"vae_scale_factor": 16, "latent_multiple": 1, "scheduler_kind": "flow", "guidance_kind": "cfg"}),
        Case("z-image", tiny.tiny_z_image_pipeline, {"guidance": 3.0, "negative": "fog"},
             {"guidance_scale": 3.0, "negative_prompt": "fog"}, ("default", "unipc"), pipeline_sigmas=True,
             single_file_keys=("noise_refiner.0.attention.to_q.weight",), refusals=(NOT_A_TOKEN, NO_DDIM),
             img2img="ZImageImg2ImgPipeline",
             facts={"vae_scale_factor": 8, "latent_multiple": 2, "scheduler_kind": "flow", "guidance_kind": "cfg"}),
        Case("sd3", tiny.tiny_sd3_pipeline, CFG, CFG_THEIRS, img2img="StableDiffusion3Img2ImgPipeline",
             single_file_keys=("joint_blocks.0.x_block.attn.qkv",),
             refusals=(NOT_A_TOKEN, (("--size", "1024x256", "--positions", "global"),
                                     "position table covers 768px a side, the canvas is 1024x256")),
             facts={"vae_scale_factor": 8, "latent_multiple": 2, "scheduler_kind": "flow", "guidance_kind": "cfg",
                    "positions": "table", "max_global_px": 768}),
        Case("pixart-sigma", tiny.tiny_pixart_sigma_pipeline, {"guidance": 4.5, "negative": "fog"},
             {"guidance_scale": 4.5, "negative_prompt": "fog", "use_resolution_binning": False,
              "clean_caption": False}, ("default", "unipc"), tolerance=1e-6,
             refusals=((("--positions", "global"), "--positions"), (("--true-cfg", "2"), "--true-cfg")),
             facts={"vae_scale_factor": 8, "latent_multiple": 2, "scheduler_kind": "ddpm", "guidance_kind": "cfg"}),
        Case("qwen-image", tiny.tiny_qwen_image_pipeline, {"guidance": 4.0, "negative": "fog"},
             {"true_cfg_scale": 4.0, "negative_prompt": "fog"}, ("default", "unipc"), to_canvas=unpacked,
             img2img="QwenImageImg2ImgPipeline",
             refusals=((("--size", "520x256"), "--size: width 520 is not a multiple of 16"),
                       (("--steps", "1"), "needs at least 2 steps"), (("--vae-spill", "/tmp"), "keeps no whole-image"),
                       (("--true-cfg", "4"), "its guidance is classifier-free already: use --guidance")),
             facts={"vae_scale_factor": 8, "latent_multiple": 2, "scheduler_kind": "flow", "guidance_kind": "cfg",
                    "vae_engine": "halo"}),
        Case("sana", tiny.tiny_sana_pipeline, {"guidance": 4.5, "negative": "fog"},
             {"guidance_scale": 4.5, "negative_prompt": "fog", "use_resolution_binning": False},
             ("default", "euler"),
             refusals=((("--size", "260x256"), "--size: width 260 is not a multiple of 8"),
                       (("--positions", "global"), "has no position ids"), NO_DDIM),
             facts={"vae_scale_factor": 8, "latent_multiple": 1, "scheduler_kind": "flow", "guidance_kind": "cfg",
                    "vae_engine": "halo"}),
        Case("terrain-consistency", None,
             refusals=((("--tile", "256"), "only takes 128x128 tiles"), (("--scheduler", "ddim"), "own sampler")),
             facts={"vae_scale_factor": 1, "scheduler_kind": "consistency", "guidance_kind": "none",
                    "vae_engine": "none"}),
    )
}  # fmt: skip


def pipeline_latents(pipe: Any, case: Case, scheduler: str, mu: float | None, steps: int = STEPS,
                     size: int = SIZE, **kwargs: Any) -> torch.Tensor:  # fmt: skip
    """The diffusers pipeline's latents for the compared image, its scheduler swapped for the gigadiff scheduler
    of that name (configured as gigadiff configures it)."""
    from gigadiff.schedulers import make_scheduler

    base = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler, base, case.facts["scheduler_kind"], mu)
    extra = {"prompt": PROMPT, **case.theirs, **kwargs}
    if case.pipeline_sigmas:
        extra["sigmas"] = np.array(torch.linspace(1.0, 1 / steps, steps).tolist())
    try:
        out = pipe(height=size, width=size, num_inference_steps=steps, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(3), **extra).images  # fmt: skip
    finally:
        pipe.scheduler = base
    return out.float()
