"""What every diffusers-pipeline adapter shares: device and dtype, schedulers, the codec, guidance plumbing.

A family adapter subclasses `DiffusersBackend`, encodes prompts in `condition`, runs its denoiser in
`predict_branch` (one guidance pass) and, where it can batch both passes into one call, in `predict`; its
`combine` is its pipeline's guidance formula. Torch-free at import (gigadiff.lazy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from gigadiff.backends.codec import VaeCodec
from gigadiff.backends.flow import set_flow_timesteps
from gigadiff.backends.pipelines import weights_fingerprint
from gigadiff.facts import ModelInfo
from gigadiff.schedulers import make_scheduler

if TYPE_CHECKING:
    import torch

    from gigadiff.geometry import Tile


class DiffusersBackend:
    """Base of the diffusers adapters (see the module docstring). `denoiser`: the pipeline's UNet/transformer."""

    def __init__(self, pipe: Any, info: ModelInfo, denoiser: Any):
        self.pipe = pipe
        self.denoiser = denoiser
        self.device = denoiser.device
        self.dtype = denoiser.dtype
        self.base_scheduler = pipe.scheduler
        self.info = replace(info, fingerprint=weights_fingerprint(denoiser, pipe.vae))
        self.codec = self.make_codec()

    def make_codec(self) -> VaeCodec:
        return VaeCodec(self.pipe.vae, self.device, self.info.vae_engine, self.vae_networks(),
                        sample_posterior=self.samples_posterior)  # fmt: skip

    samples_posterior = True
    """Whether the family's img2img pipeline draws the init image's latents from the VAE's posterior (SD, FLUX.1)
    or takes its mode."""

    def vae_networks(self) -> Any:
        """What the VAE's engine needs beside the VAE (the halo engine: its decoder and encoder networks)."""
        return None

    def scheduler(self, name: str, steps: int, sigmas: Sequence[float] | None, mu: float | None) -> Any:
        scheduler = make_scheduler(name, self.base_scheduler, self.info.scheduler_kind, mu)
        if self.info.scheduler_kind == "flow":
            set_flow_timesteps(scheduler, steps, sigmas, mu, self.device, self.default_sigmas, self.always_sigmas)
        elif sigmas:
            scheduler.set_timesteps(sigmas=list(sigmas), device=self.device)
        else:
            scheduler.set_timesteps(steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return scheduler

    always_sigmas = False
    """Whether the family's pipeline gives its sigma schedule to every solver that accepts one (Z-Image), or
    only to those without their own flow sigmas (FLUX)."""

    def default_sigmas(self, steps: int) -> list[float] | None:
        """A flow family's default sigma schedule (the FLUX pipelines': 1 down to 1/steps; None: the scheduler's
        own, for pipelines that give none)."""
        from gigadiff.backends.flow import linspace_sigmas

        return linspace_sigmas(steps)

    def condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> Any:  # fmt: skip
        raise NotImplementedError

    def branches(self, cond: Any) -> int:
        return 2 if cond.cfg else 1

    def predict(self, latent_tiles: torch.Tensor, t: Any, cond: Any, tiles: Sequence[Tile]) -> torch.Tensor:
        if self.branches(cond) == 1:
            return self.predict_branch(latent_tiles, t, cond, tiles, 1)
        uncond = self.predict_branch(latent_tiles, t, cond, tiles, 0)
        return self.combine(uncond, self.predict_branch(latent_tiles, t, cond, tiles, 1), cond)

    def predict_branch(
        self, latent_tiles: torch.Tensor, t: Any, cond: Any, tiles: Sequence[Tile], branch: int
    ) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, uncond: torch.Tensor, cond_out: torch.Tensor, cond: Any) -> torch.Tensor:
        """Classifier-free guidance: uncond + scale x (cond - uncond)."""
        return uncond + cond.scale * (cond_out - uncond)


class TransformerBackend(DiffusersBackend):
    """Base of the DiT adapters: their denoiser is the pipeline's `transformer`."""

    def __init__(self, pipe: Any, info: ModelInfo):
        super().__init__(pipe, info, pipe.transformer)
        self.transformer = pipe.transformer


class NegativeGuided:
    """Mixin of a conditioning whose `negative` text is present exactly when classifier-free guidance runs."""

    negative: Any

    @property
    def cfg(self) -> bool:
        return self.negative is not None


@contextlib.contextmanager
def instance_override(module: Any, name: str, value: Any) -> Iterator[None]:
    """While inside, `module.name` is `value` for this instance only (shadowing its class's method); the
    class's own is back on exit, even on error. How an adapter changes one step of a diffusers model (its
    position ids or table crop) without copying the model's forward."""
    setattr(module, name, value)
    try:
        yield
    finally:
        delattr(module, name)
