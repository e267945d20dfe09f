"""Stable Diffusion 1.x/2.x: UNet denoisers with CLIP text encoders and the 4-channel AutoencoderKL.

Epsilon and v-prediction models alike (the scheduler config says which); the adapter is gigadiff.backends.unet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from gigadiff.backends.family import Family, Preset, vae_factor

if TYPE_CHECKING:
    from gigadiff.backends.base import Backend
    from gigadiff.backends.source import ModelSource
    from gigadiff.facts import ModelInfo


def unet_native(source: ModelSource, factor: int, default: int) -> int:
    """The training size in image px: the UNet's sample size times the VAE factor (the default without a config)."""
    sample = source.config("unet").get("sample_size")
    if sample is None:
        return default
    return (max(sample) if isinstance(sample, list | tuple) else int(sample)) * factor


class StableDiffusion(Family):
    name = "sd"
    pipelines = ("StableDiffusionPipeline",)
    single_file_markers = ("model.diffusion_model.input_blocks",)
    single_file_pipeline = "StableDiffusionPipeline"
    presets = (
        Preset("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", steps=30, guidance=7.5),
        Preset("sd21", "stabilityai/stable-diffusion-2-1", steps=30, guidance=7.5),
    )
    sdxl: ClassVar[bool] = False
    controlnet_class = "ControlNetModel"
    gpu_dtype = "fp16"  # as their pipelines are run; SDXL's VAE is upcast while it runs (force_upcast)

    def matches(self, source: ModelSource) -> bool:
        if source.kind == "file" and not source.file_keys:  # a pickled .ckpt: the classic SD checkpoint
            return not self.sdxl and source.location.endswith(".ckpt")
        return super().matches(source)

    def describe(self, source: ModelSource) -> ModelInfo:
        factor = vae_factor(source)
        channels = int(source.config("unet").get("in_channels", 4))
        native = unet_native(source, factor, self.default_native)
        return self.base_info(source, latent_channels=channels, vae_scale_factor=factor, native_size=native)

    def adapt(self, pipe: Any, info: ModelInfo) -> Backend:
        from gigadiff.backends.unet import UNetBackend

        return UNetBackend(pipe, info, sdxl=self.sdxl)
