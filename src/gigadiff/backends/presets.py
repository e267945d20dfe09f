"""Short names for popular models, with the defaults that suit each of them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPreset:
    repo: str
    steps: int
    guidance: float
    native_size: int | None = None
    """The size the model was trained at, where its UNet config does not say it (SDXL-Turbo: 512)."""


PRESETS: dict[str, ModelPreset] = {
    "sd15": ModelPreset("stable-diffusion-v1-5/stable-diffusion-v1-5", steps=30, guidance=7.5),
    "sd21": ModelPreset("stabilityai/stable-diffusion-2-1", steps=30, guidance=7.5),
    "sdxl": ModelPreset("stabilityai/stable-diffusion-xl-base-1.0", steps=30, guidance=5.0),
    "sdxl-turbo": ModelPreset("stabilityai/sdxl-turbo", steps=4, guidance=0.0, native_size=512),
}
