"""The initial noise of a generation, drawn for the whole canvas at once.

Drawn exactly as diffusers' pipelines draw it (`randn_tensor` with a CPU `torch.Generator` seeded with the
seed), so that a canvas that fits in one tile reproduces the plain diffusers pipeline, and the same seed
gives the same picture on CPU and CUDA. The same generator object is then handed to stochastic schedulers
(Euler ancestral, DDPM, SDE solvers), again as diffusers does.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def canvas_noise(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normal noise of `shape` (float32), drawn on the CPU and moved to `device`."""
    return randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32).to(device)
