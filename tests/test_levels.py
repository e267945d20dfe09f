"""Level consensus: tiles share the canvas's low frequencies, so no tile paints its own plateau."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from gigadiff.events import NullListener
from gigadiff.executors.local import LocalExecutor
from gigadiff.facts import ModelInfo
from gigadiff.geometry import GridPlan
from gigadiff.levels import LevelConsensus, level_field, piecewise_linear
from gigadiff.lowpass import gaussian_lowpass
from gigadiff.metrics import grid_anisotropy
from gigadiff.sampler import CanvasDenoiser


@pytest.mark.parametrize("wrap", [(False, False), (True, True), (False, True)])
def test_lowpass_keeps_constants_and_removes_fine_detail(wrap):
    flat = torch.full((1, 2, 40, 70), 3.5)
    assert torch.allclose(gaussian_lowpass(flat, 6.0, wrap), flat)
    checker = (torch.arange(64).view(-1, 1) + torch.arange(64)).remainder(2).float()[None, None] * 2 - 1
    assert gaussian_lowpass(checker, 4.0, wrap).abs().max() < 1e-3


def test_lowpass_on_a_ring_commutes_with_rolling_it():
    x = torch.randn(1, 1, 48, 96, generator=torch.Generator().manual_seed(0))
    rolled = gaussian_lowpass(torch.roll(x, (7, 30), (2, 3)), 8.0, (True, True))
    assert torch.allclose(rolled, torch.roll(gaussian_lowpass(x, 8.0, (True, True)), (7, 30), (2, 3)), atol=1e-5)


def test_lowpass_fits_axes_shorter_than_its_kernel():
    x = torch.randn(1, 1, 5, 200, generator=torch.Generator().manual_seed(1))
    out = gaussian_lowpass(x, 32.0)
    assert out.shape == x.shape and torch.isfinite(out).all()


@dataclass
class MeanReader:
    """A stand-in denoiser that reads its window's level as tiles do: detail passes with gain `detail`, the
    window's mean with gain `level` (so every tile paints its own plateau)."""

    detail: float = 0.02
    level: float = 0.3
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    info: ModelInfo = field(default_factory=lambda: ModelInfo("reader", "test", 1, 1, 64))

    def predict(self, tiles: torch.Tensor, t: Any, cond: Any, _tiles: Any) -> torch.Tensor:
        mean = tiles.mean(dim=(-2, -1), keepdim=True)
        return self.detail * (tiles - mean) + self.level * mean


def _canvas(size: int = 352) -> torch.Tensor:
    """Smooth hills larger than a tile plus fine noise, like a noisy canvas at high noise."""
    g = torch.Generator().manual_seed(3)
    hills = gaussian_lowpass(torch.randn(1, 1, size, size, generator=g), 48.0) * 40
    return hills + 0.2 * torch.randn(1, 1, size, size, generator=g)


def _denoise(level_sync: bool) -> tuple[torch.Tensor, Any, GridPlan]:
    plan = GridPlan(352, 352, 64, 16, shifted=False)
    local = CanvasDenoiser(MeanReader(), None, LocalExecutor(4), plan, "linear")
    denoiser = LevelConsensus(local) if level_sync else local
    return denoiser(_canvas(), 1.0, 0, plan.grid(0), NullListener()), denoiser, plan


def test_tiles_reading_their_own_level_leave_plateaus_which_consensus_removes():
    plain, _, _ = _denoise(False)
    synced, denoiser, _ = _denoise(True)
    before, after = grid_anisotropy(plain[0, 0].numpy()), grid_anisotropy(synced[0, 0].numpy())
    assert before.ratio > 5, "each tile paints its window's mean: a grid of plateaus"
    assert abs(math.log(after.ratio)) < 3 * after.null_sd, "no more axis-aligned structure than chance"
    assert denoiser.gains == [[pytest.approx(0.3, abs=1e-4)]], "the probe measures the model's level gain"
    assert denoiser.probe_calls == 1 and denoiser.model_calls == denoiser.local.model_calls + 1


def test_consensus_adds_the_level_field_through_the_measured_gain():
    """Reference: the model's detail response to x minus the field, plus the level gain times the field."""
    synced, _, _ = _denoise(True)
    x = _canvas()
    field = level_field(x, 64 / (2 * torch.pi**0.5))
    detail = x - field
    assert torch.allclose(synced - 0.3 * field, _plain_on(detail), atol=1e-4)


def _plain_on(x: torch.Tensor) -> torch.Tensor:
    plan = GridPlan(352, 352, 64, 16, shifted=False)
    local = CanvasDenoiser(MeanReader(), None, LocalExecutor(4), plan, "linear")
    return local(x, 1.0, 0, plan.grid(0), NullListener())


def test_a_single_tile_canvas_is_left_alone():
    plan = GridPlan(64, 64, 64, 16, shifted=False)
    x = _canvas(64)
    local = CanvasDenoiser(MeanReader(), None, LocalExecutor(4), plan, "linear")
    synced = LevelConsensus(local)(x, 1.0, 0, plan.grid(0), NullListener())
    assert torch.allclose(synced, MeanReader().predict(x, None, None, None), atol=1e-6)


def test_the_level_response_is_followed_where_the_model_saturates():
    """A model whose level saturates (outputs within (-1, 1)): a linear gain would push the field past that
    range; the measured response curve keeps the result inside it."""

    class Saturating(MeanReader):
        def predict(self, tiles: torch.Tensor, t: Any, cond: Any, _tiles: Any) -> torch.Tensor:
            mean = tiles.mean(dim=(-2, -1), keepdim=True)
            return self.detail * (tiles - mean) + torch.tanh(0.3 * mean)

    plan = GridPlan(352, 352, 64, 16, shifted=False)
    local = CanvasDenoiser(Saturating(), None, LocalExecutor(4), plan, "linear")
    x = _canvas() * 6
    synced = LevelConsensus(local)(x, 1.0, 0, plan.grid(0), NullListener())
    assert synced.abs().max() < 1.0
    smooth = gaussian_lowpass(x, 64 / (2 * torch.pi**0.5))
    linear = torch.tanh(0.3 * smooth.mean()) + 0.3 * (smooth - smooth.mean())  # the slope at the canvas level is < 0.3
    assert linear.abs().max() > 1.05, "a linear response would have left the range"


def test_piecewise_linear_interpolates_and_holds_the_end_values():
    knots = torch.tensor([[-2.0, -1.0, 0.0, 1.0, 2.0], [-1.0, -0.5, 0.0, 0.5, 1.0]])
    values = torch.tensor([[-1.0, -0.8, 0.0, 0.5, 0.6], [0.0, 0.0, 0.0, 0.0, 0.0]])
    x = torch.tensor([-3.0, -1.5, 0.5, 2.0, 4.0]).view(1, 1, 1, 5).repeat(1, 2, 1, 1)
    out = piecewise_linear(x, knots, values)
    assert torch.allclose(out[0, 0, 0], torch.tensor([-1.0, -0.9, 0.25, 0.6, 0.6]))
    assert torch.equal(out[0, 1], torch.zeros(1, 5))


def test_results_stay_inside_the_range_the_model_declares():
    plan = GridPlan(352, 352, 64, 16, shifted=False)
    bounded = MeanReader(info=ModelInfo("reader", "test", 1, 1, 64, prediction_range=(-0.1, 0.1)))
    synced = LevelConsensus(CanvasDenoiser(bounded, None, LocalExecutor(4), plan, "linear"))
    out = synced(_canvas(), 1.0, 0, plan.grid(0), NullListener())
    assert out.min() == -0.1 and out.max() == 0.1


def test_the_level_field_spreads_as_much_at_the_border_as_inside():
    """White noise blurred with variance edges has the interior's variance in its border rows; mirrored edges
    give the border rows about twice as much (the level the model would read there)."""
    noise = torch.randn(64, 1, 96, 96, generator=torch.Generator().manual_seed(0))
    sigma = 8.0
    variance = level_field(noise, sigma).var(dim=(0, 1, 3))
    mirrored = gaussian_lowpass(noise - noise.mean(dim=(-2, -1), keepdim=True), sigma).var(dim=(0, 1, 3))
    inside = variance[40:56].mean()
    assert variance[0] / inside == pytest.approx(1.0, abs=0.15)
    assert mirrored[0] / mirrored[40:56].mean() > 1.6
