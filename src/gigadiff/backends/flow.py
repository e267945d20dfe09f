"""What flow-matching families share: their sigma schedules, token packing and position ids.

The timestep shift (mu) a run uses is computed before any model loads (gigadiff.shift); here it is given to
the schedulers as diffusers' flow pipelines give it. Torch-free at import; the tensor helpers import it through
gigadiff.lazy.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gigadiff.errors import GigadiffError
from gigadiff.lazy import torch
from gigadiff.schedulers import takes_mu, takes_sigmas

if TYPE_CHECKING:
    import torch as torch_types


def linspace_sigmas(steps: int) -> list[float]:
    """The default flow schedule of FLUX pipelines: sigmas from 1 down to 1/steps (numpy float64)."""
    import numpy as np

    return list(np.linspace(1.0, 1 / steps, steps))


def set_flow_timesteps(
    scheduler: Any, steps: int, sigmas: Sequence[float] | None, mu: float | None, device: Any,
    default_sigmas: Any = linspace_sigmas, always_sigmas: bool = False,
) -> None:  # fmt: skip
    """Set timesteps as diffusers' flow pipelines do: mu to schedulers that shift dynamically, and the family's
    default sigmas to solvers that take them (FLUX's pipelines give none to solvers with their own flow sigmas;
    `always_sigmas`: Z-Image's give them to every solver that accepts a schedule)."""
    import numpy as np

    kwargs: dict[str, Any] = {}
    if takes_mu(scheduler):
        kwargs["mu"] = mu
    accepts = "sigmas" in inspect.signature(scheduler.set_timesteps).parameters
    if sigmas is None and (takes_sigmas(scheduler) or (always_sigmas and accepts)):
        sigmas = default_sigmas(steps)
    if sigmas is not None:
        if not accepts:
            raise GigadiffError(
                f"{{scheduler}} {type(scheduler).__name__} takes no explicit {{sigmas}}; remove them or choose "
                "euler, euler_a, unipc or lcm",
                "scheduler",
                "sigmas",
            )
        scheduler.set_timesteps(sigmas=np.asarray(sigmas, dtype=np.float64), device=device, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)


def pack(x: torch_types.Tensor, p: int = 2) -> torch_types.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p] tokens, row-major, channels then the p x p patch (FLUX.1's order)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack(tokens: torch_types.Tensor, h: int, w: int, p: int = 2) -> torch_types.Tensor:
    """The inverse of `pack` for an [h, w] latent."""
    b, _, d = tokens.shape
    c = d // (p * p)
    x = tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def grid_ids(rows: int, cols: int, top: int = 0, left: int = 0, axes: int = 3, row_axis: int = 1,
             dtype: Any = None, device: Any = None) -> torch_types.Tensor:  # fmt: skip
    """Token position ids [rows * cols, axes], row-major: axis `row_axis` holds top + row, the next left + col,
    every other axis 0 (FLUX.1's 3-axis ids: (0, row, col); FLUX.2's 4-axis: (0, row, col, 0))."""
    ids = torch.zeros(rows, cols, axes, dtype=dtype or torch.float32, device=device)
    ids[..., row_axis] = (torch.arange(rows, device=device) + top)[:, None].to(ids.dtype)
    ids[..., row_axis + 1] = (torch.arange(cols, device=device) + left)[None, :].to(ids.dtype)
    return ids.reshape(rows * cols, axes)
