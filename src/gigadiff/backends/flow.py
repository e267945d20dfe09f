"""What flow-matching families share: the timestep shift, their sigma schedules, token packing and positions.

**The shift from what the model sees.** Flow models are trained with a schedule shifted toward high noise by
exp(mu), and diffusers computes mu from the image's token count (the more tokens, the more of the picture
survives a given sigma, so the schedule lingers at high noise). In a tiled run the model never sees the
canvas: every call sees one tile. Computed from a 4096² canvas (65536 FLUX tokens), mu is 11.5 and
exp(mu) = 99 000: every sigma above 10^-4 is pushed within 1% of full noise, and almost no step denoises
(bench/flow_shift.py prints the schedules). gigadiff therefore computes mu from the tokens of one tile, the
resolution each model call is at, unless `--flow-shift` fixes it (a shift s, i.e. mu = ln s, or mu=X), and
records the value in the output's metadata.

Torch-free at import; the tensor helpers import it through gigadiff.lazy.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gigadiff.backends.base import ShiftRule
from gigadiff.errors import GigadiffError
from gigadiff.lazy import torch
from gigadiff.schedulers import takes_mu, takes_sigmas

if TYPE_CHECKING:
    import torch as torch_types

FLOW_SHIFT_MODES = ("tile", "canvas")
_MU = re.compile(r"^\s*mu\s*=\s*(-?[0-9.eE+-]+)\s*$")


def linear_mu(rule: ShiftRule, tokens: int) -> float:
    """FLUX.1's rule (`calculate_shift`): mu linear in tokens, base_shift at base_seq_len, max_shift at max."""
    slope = (rule.max_shift - rule.base_shift) / (rule.max_seq_len - rule.base_seq_len)
    return tokens * slope + rule.base_shift - slope * rule.base_seq_len


def empirical_mu(tokens: int, steps: int) -> float:
    """FLUX.2's fitted rule (`compute_empirical_mu`): linear in tokens, interpolated between fits at 10 and
    200 steps up to 4300 tokens, the 200-step fit beyond (coefficients as in diffusers)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if tokens > 4300:
        return a2 * tokens + b2
    m_200, m_10 = a2 * tokens + b2, a1 * tokens + b1
    a = (m_200 - m_10) / 190.0
    return a * steps + (m_200 - 200.0 * a)


def rule_mu(rule: ShiftRule, tokens: int, steps: int) -> float | None:
    """mu for an image of `tokens` tokens under the family's rule; None for a fixed (or no) shift."""
    if rule.kind == "linear":
        return linear_mu(rule, tokens)
    if rule.kind == "empirical":
        return empirical_mu(tokens, steps)
    return None


def parse_flow_shift(text: str) -> str | float:
    """ "tile", "canvas", "mu=X" (returned as a float mu) or a shift s > 0 (returned as mu = ln s)."""
    if text in FLOW_SHIFT_MODES:
        return text
    m = _MU.match(text)
    try:
        if m:
            return float(m.group(1))
        shift = float(text)
    except ValueError:
        shift = float("nan")
    if not math.isfinite(shift) or shift <= 0:
        raise GigadiffError(
            f"{{flow_shift}} {text!r} must be tile, canvas, a shift > 0 (e.g. 3) or mu=X (e.g. mu=1.15)", "flow_shift"
        )
    return math.log(shift)


def run_mu(rule: ShiftRule, flow_shift: str, tile_tokens: int, canvas_tokens: int, steps: int) -> float | None:
    """The mu a run uses: from one tile's tokens ("tile"), the whole canvas's ("canvas", diffusers' rule on
    the canvas), or a fixed value; None keeps a fixed-shift model's own shift."""
    parsed = parse_flow_shift(flow_shift)
    if isinstance(parsed, float):
        return parsed
    tokens = tile_tokens if parsed == "tile" else canvas_tokens
    return rule_mu(rule, tokens, steps)


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
