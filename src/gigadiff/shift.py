"""The timestep shift of flow-matching models: from what the model sees, or as the user fixes it. Torch-free.

**The shift from what the model sees.** Flow models are trained with a schedule shifted toward high noise by
exp(mu), and diffusers computes mu from the image's token count (the more tokens, the more of the picture
survives a given sigma, so the schedule lingers at high noise). In a tiled run the model never sees the
canvas: every call sees one tile. Computed from a 4096² canvas (65536 FLUX tokens), mu is 11.5 and
exp(mu) = 99 000: every sigma above 10^-4 is pushed within 1% of full noise, and almost no step denoises
(bench/flow_shift.py prints the schedules). gigadiff therefore computes mu from the tokens of one tile, the
resolution each model call is at, unless `--flow-shift` fixes it (a shift s, i.e. mu = ln s, or mu=X), and
records the value in the output's metadata.
"""

from __future__ import annotations

import math
import re

from gigadiff.errors import GigadiffError
from gigadiff.facts import ModelInfo, ShiftRule

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


def tile_mu(info: ModelInfo, flow_shift: str, tile_px: int, height_px: int, width_px: int, steps: int) -> float | None:
    """The mu of a run (or a progressive stage) whose calls see tiles of `tile_px` (clamped to the canvas) on a
    canvas of height_px x width_px; None for models that are not flow models."""
    if info.scheduler_kind != "flow":
        return None
    token = info.size_multiple
    tile_tokens = (min(tile_px, height_px) // token) * (min(tile_px, width_px) // token)
    return run_mu(info.shift_rule, flow_shift, tile_tokens, (height_px // token) * (width_px // token), steps)


def run_mu(rule: ShiftRule, flow_shift: str, tile_tokens: int, canvas_tokens: int, steps: int) -> float | None:
    """The mu a run uses: from one tile's tokens ("tile"), the whole canvas's ("canvas", diffusers' rule on
    the canvas), or a fixed value; None keeps a fixed-shift model's own shift."""
    parsed = parse_flow_shift(flow_shift)
    if isinstance(parsed, float):
        return parsed
    tokens = tile_tokens if parsed == "tile" else canvas_tokens
    return rule_mu(rule, tokens, steps)
