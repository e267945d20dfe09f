"""Multistep consistency sampling as a diffusers-style scheduler.

A consistency model maps a noisy input at any noise level straight to a clean estimate x0. Sampling with
several steps alternates: denoise at sigma_i, re-noise the estimate to sigma_{i+1}, denoise again (Song et al.,
2023, Algorithm 1, re-noises with fresh noise). Written as a scheduler whose `step` takes the fused x0
prediction, it plugs into gigadiff's sampler unchanged.

`eta` chooses the re-noising, as in DDIM: eta = 1 draws fresh noise (the classic algorithm); eta = 0 keeps each
pixel's current noise direction eps = (x - x0) / sigma, a deterministic step along the probability-flow ODE;
values between mix the two with unit variance. With tiles, eta = 0 is what lets them agree: the noise a tile
saw at step i is still there at step i + 1, now carrying the fused estimate, so structures grow across tile
borders instead of each window inventing its own from fresh noise (measured on the terrain model: with fresh
noise the output keeps a grid of tile-sized plateaus, with eta = 0 its features span tiles). Fresh noise is
drawn for the whole canvas from the run's seeded generator, so tiles never disagree about it.

The default schedule spaces the steps as in EDM (Karras et al., 2022, rho = 7) between sigma_max and
sigma_min, keeping the first `steps` levels: 1 step is sigma_max alone; 2 steps are (80, 2.52) for EDM's range.
Models distilled for one step denoise poorly at low noise; for them `sigma_floor` sets the lowest level a
multistep schedule visits, and the levels are then EDM-spaced from sigma_max down to sigma_floor inclusive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """`steps` noise levels from sigma_max down, EDM-spaced over steps + 1 levels ending at sigma_min."""
    ramp = [i / steps for i in range(steps + 1)]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in ramp][:-1]


def floored_sigmas(steps: int, sigma_floor: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """`steps` levels EDM-spaced from sigma_max to sigma_floor, both included (one step: sigma_max alone)."""
    if steps == 1:
        return [sigma_max]
    return [*karras_sigmas(steps - 1, sigma_floor, sigma_max, rho), sigma_floor]


class ConsistencyScheduler(SchedulerMixin, ConfigMixin):
    """Scheduler for models whose output is the denoised estimate x0 (e.g. EDM consistency models)."""

    order = 1
    _compatibles: ClassVar[list[str]] = []

    @register_to_config
    def __init__(
        self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, sigma_floor: float | None = None
    ):
        self.sigmas = torch.tensor([sigma_max, 0.0])
        self.timesteps = self.sigmas[:-1]
        self._step_index = 0

    @property
    def init_noise_sigma(self) -> float:
        return float(self.sigmas[0])

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        if sigmas is None:
            if not num_inference_steps or num_inference_steps < 1:
                raise ValueError("give num_inference_steps >= 1 or an explicit list of sigmas")
            cfg = self.config
            if cfg.sigma_floor:
                sigmas = floored_sigmas(num_inference_steps, cfg.sigma_floor, cfg.sigma_max, cfg.rho)
            else:
                sigmas = karras_sigmas(num_inference_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        levels = [float(v) for v in sigmas]
        if any(not math.isfinite(v) or v <= 0 for v in levels):
            raise ValueError(f"sigmas must be positive and finite, got {levels}")
        self.sigmas = torch.tensor([*levels, 0.0], dtype=torch.float32, device=device)
        self.timesteps = self.sigmas[:-1]
        self._step_index = 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._step_index = begin_index

    @property
    def step_index(self) -> int:
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        eta: float = 1.0,
        return_dict: bool = True,
    ) -> Any:
        """`model_output` is x0; return the next step's noisy input (or x0 itself after the last step)."""
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        sigma = float(self.sigmas[self._step_index])
        next_sigma = float(self.sigmas[self._step_index + 1])
        self._step_index += 1
        if next_sigma <= 0:
            prev = model_output
        else:
            direction = torch.zeros_like(model_output)
            if eta < 1:
                direction = (sample - model_output) / sigma
            if eta > 0:
                fresh = randn_tensor(model_output.shape, generator=generator, device=torch.device("cpu"),
                                     dtype=torch.float32).to(model_output.device)  # fmt: skip
                direction = math.sqrt(1 - eta**2) * direction + eta * fresh
            spread = math.sqrt(max(next_sigma**2 - self.config.sigma_min**2, 0.0))
            prev = model_output + spread * direction
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
