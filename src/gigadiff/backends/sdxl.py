"""Stable Diffusion XL: a UNet with two CLIP text encoders, pooled embeddings and micro-conditioning time ids.

The adapter is gigadiff.backends.unet's, told to condition each tile as a crop of the canvas.
"""

from __future__ import annotations

from gigadiff.backends.family import Preset
from gigadiff.backends.sd import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipelines = ("StableDiffusionXLPipeline",)
    single_file_markers = ("conditioner.embedders.1",)
    single_file_pipeline = "StableDiffusionXLPipeline"
    presets = (
        Preset("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", steps=30, guidance=5.0),
        Preset("sdxl-turbo", "stabilityai/sdxl-turbo", steps=4, guidance=0.0, native_size=512),
    )
    sdxl = True
    default_native = 1024
    default_guidance = 5.0
