"""Level consensus: tiles agree on the canvas's low frequencies instead of each inventing its own.

A tile sees only its window, so everything the model reads from scales larger than a tile is read from that
window alone. At high noise the clearest such signal is the window's mean: on the terrain model at sigma 80,
the level of a tile's prediction follows the mean of its noisy input with correlation 0.96, while with the
mean removed the levels of 32 random windows vary 5x less (measured). Neighbouring windows have different
means, so each tile paints its own base level, and fusion leaves a patchwork of tile-sized plateaus with
straight edges; a few-step sampler (a consistency model) never gets to reconcile them.

The fix splits the model input canvas x into a smooth part L (a Gaussian low-pass about a quarter of a tile wide)
and the rest:

- every tile sees x - L + mean(L): the same level everywhere, the window's detail unchanged;
- the fused prediction gets R(L - mean(L)) added back, R the model's response to a uniform shift of its
  input level, measured at every step on the grid's middle tile: the mean of its prediction with its input
  shifted by -3, -1, 1 and 3 spreads of the field (0.3% of a Gaussian field lies beyond), against its
  prediction in the fused pass, joined by a polyline (4 extra tiles per step, in one batch). Each channel
  has its own curve (a diagonal response).

So the low frequencies pass through the model's measured response, the same at every pixel, rather than
through a patchwork of per-window responses, and the model still sees the canvas's overall level. Near 0 the
curve's slope is what the denoiser's shrinkage makes of a level at that noise level (terrain: 0.2-0.6 at
sigma 80, about 1 at sigma 10); measuring a curve, not a slope, keeps the output inside the model's range
where the response saturates (a linear gain pushed the terrain model's heights past its [-1, 1] range).
The curve is the probe window's, whose level is the canvas's; where the local level is near a bound, the
result is clamped to the model's `prediction_range` (its own outputs never leave it either). The probe runs
with the background conditioning alone, so regional prompts are refused with it (settings).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from gigadiff.backends.base import Backend
from gigadiff.events import Listener
from gigadiff.executors.local import Batch, TileExecutor
from gigadiff.fusion import gather_tile
from gigadiff.geometry import GridPlan, Tile, TileGrid
from gigadiff.lowpass import gaussian_lowpass
from gigadiff.sampler import CanvasDenoiser

PROBE_SHIFTS = (-3.0, -1.0, 1.0, 3.0)
"""Where the response curve is measured: input levels this many field spreads from the canvas level."""
WIDTH_PER_TILE = 1 / (2 * math.sqrt(math.pi))
"""Standard deviation of the low-pass, in tile sides: a Gaussian window of sigma = T / (2 sqrt(pi)) averages
over an effective area 4 pi sigma^2 = T^2, one tile's, so the field varies as much as the tile means the model
reads. A narrower one lets blurred noise paint its own blobs (at T / 8: 5x the variance, a map of round
peaks); a wider one leaves more of the tile-scale level to the windows (measured on the terrain model)."""


def level_field(x: torch.Tensor, sigma: float, wrap: tuple[bool, bool] = (False, False)) -> torch.Tensor:
    """The canvas's smooth level around its mean: what a tile-sized window of `x` reads as its level.

    Its spread must be the same at the canvas border as inside: the model responds to levels as it learned
    them, and a mirrored blur doubles the spread of the noise's level along the border (terrain: the highest
    0.5% of the map gathered in its outer 16 px, at the model's clamp). So the blur keeps the variance of
    noise at the edges ("variance" edges), and the field is taken around the canvas mean."""
    centred = x - x.mean(dim=(-2, -1), keepdim=True)
    return gaussian_lowpass(centred, sigma, wrap, edges="variance")


@dataclass
class LevelConsensus:
    """A `Denoiser` around a CanvasDenoiser whose tiles all see one level (see the module docstring)."""

    local: CanvasDenoiser
    gains: list[list[float]] = field(default_factory=list)
    """Each step's gain per channel: the response curve's slope between the probes at -1 and +1 spreads."""
    probe_calls: int = 0
    probe_pixels: int = 0

    @property
    def plan(self) -> GridPlan:
        return self.local.plan

    @property
    def model_calls(self) -> int:
        return self.local.model_calls + self.probe_calls

    @property
    def evaluated_pixels(self) -> int:
        return self.local.evaluated_pixels + self.probe_pixels

    def passes(self, grid: TileGrid) -> list[tuple[Any, TileGrid, torch.Tensor | None]]:
        passes = self.local.passes(grid)
        if len(grid) < 2:
            return passes
        return [*passes, (self.local.cond, probe_grid(probe_window(grid)), None)]

    def __call__(self, x: torch.Tensor, t: Any, step: int, grid: TileGrid, listener: Listener) -> torch.Tensor:
        if len(grid) < 2:  # one window sees the whole canvas: nothing to agree on
            return self.local(x, t, step, grid, listener)
        field_ = level_field(x.float(), WIDTH_PER_TILE * self.plan.tile, grid.wrap).to(x.dtype)
        detail = x - field_
        probe = probe_window(grid)
        executor = self.local.executor
        self.local.executor = capture = Capture(executor, probe)
        try:
            fused = self.local(detail, t, step, grid, listener)
        finally:
            self.local.executor = executor
        assert capture.prediction is not None
        knots, responses = self._response(gather_tile(detail, probe), capture.prediction, field_, t, listener)
        self.gains.append(((responses[..., 3] - responses[..., 1]) / (knots[..., 3] - knots[..., 1])).tolist())
        correction = piecewise_linear(field_.float(), knots, responses)
        out = fused + correction.to(fused.device, fused.dtype)
        bounds = self.local.backend.info.prediction_range
        return out if bounds is None else out.clamp(*bounds)

    def _response(
        self, crop: torch.Tensor, base: torch.Tensor, field_: torch.Tensor, t: Any, listener: Listener
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe window's mean prediction as its input level moves by PROBE_SHIFTS field spreads, less its
        prediction in the fused pass: ([C, K] shifts, [C, K] responses), K = len(PROBE_SHIFTS) + 1, sorted.

        The shifted copies of the window run side by side as one small canvas: one batch, whatever executor."""
        spread = field_.float().std(dim=(-2, -1)).mean(dim=0).clamp_min(1e-3)  # [C]
        shifts = [s * spread for s in PROBE_SHIFTS]
        canvas = torch.cat([crop + d.to(crop.dtype).view(1, -1, 1, 1) for d in shifts], dim=-1)
        grid = probe_grid(Tile(0, 0, *crop.shape[-2:]))
        local = self.local
        means = []
        for batch in local.executor.predictions(local.backend, canvas, t, local.cond, grid):
            means += [p.float().mean(dim=(0, 2, 3)) for p in batch.predictions.chunk(len(batch.tiles))]
            self.probe_calls += batch.calls
            listener.on_tiles_done(len(batch.tiles))
        self.probe_pixels += grid.evaluated_pixels
        level = base.float().mean(dim=(0, 2, 3))
        knots = torch.stack([*shifts, torch.zeros_like(spread)], dim=-1)
        responses = torch.stack([*(m - level for m in means), torch.zeros_like(level)], dim=-1)
        order = knots.argsort(dim=-1)
        return knots.gather(-1, order), responses.gather(-1, order)


def probe_window(grid: TileGrid) -> Tile:
    """The window the level response is measured on: the grid's middle one (full-size, interior)."""
    return grid.tiles[len(grid.tiles) // 2]


def probe_grid(window: Tile) -> TileGrid:
    """The probe copies of `window`, one per PROBE_SHIFTS entry, side by side on one small canvas."""
    tiles = tuple(Tile(0, k * window.w, window.h, window.w) for k in range(len(PROBE_SHIFTS)))
    return TileGrid(window.h, len(tiles) * window.w, tiles)


def piecewise_linear(x: torch.Tensor, knots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per channel, the polyline through (knots[c, k], values[c, k]) (knots increasing) at x [B, C, H, W], held
    at the end values beyond the end knots: a response is never extrapolated past what was measured (extended
    along its end segments it pushed the terrain's rare highest levels onto the model's clamp)."""
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        u, v = knots[c], values[c]
        slopes = (v[1:] - v[:-1]) / (u[1:] - u[:-1]).clamp_min(1e-12)
        xc = x[:, c].clamp(float(u[0]), float(u[-1]))
        segment = torch.bucketize(xc.contiguous(), u[1:-1])  # 0 .. K-2
        out[:, c] = v[segment] + slopes[segment] * (xc - u[segment])
    return out


@dataclass
class Capture:
    """An executor that passes another's predictions through and keeps the one for `tile`."""

    inner: TileExecutor
    tile: Tile
    prediction: torch.Tensor | None = None

    def predictions(self, backend: Backend, canvas: torch.Tensor, t: Any, cond: Any, grid: TileGrid) -> Iterator[Batch]:
        for batch in self.inner.predictions(backend, canvas, t, cond, grid):
            if self.tile in batch.tiles:
                self.prediction = batch.predictions.chunk(len(batch.tiles))[list(batch.tiles).index(self.tile)]
            yield batch
