"""Progressive coherence: stage sizes, fade schedules, dilated views that partition the canvas, end-to-end runs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gigadiff.api import generate_result
from gigadiff.errors import GigadiffError
from gigadiff.options import RunRequest
from gigadiff.recipes.coherence import (
    cosine_fade,
    deinterleave,
    enlarge,
    interleave,
    stage_sizes,
    view_grid,
)
from gigadiff.runs.checks import settings_for
from gigadiff.vae.tiling import VaeTiling


def test_stage_sizes_double_up_to_the_canvas_from_at_most_the_native_size():
    assert stage_sizes(512, 512, 128) == [(128, 128), (256, 256), (512, 512)]  # 4096² with a 1024² model
    assert stage_sizes(300, 500, 128) == [(75, 125), (150, 250), (300, 500)]
    assert stage_sizes(128, 1024, 64) == [(64, 512), (128, 1024)]  # a panorama: its first stage is tiled
    assert stage_sizes(64, 640, 64) == [(64, 640)]  # no stage when the shorter side is native


def test_fades_start_at_one_and_fall_to_zero_faster_with_a_higher_exponent():
    for exponent in (1.0, 3.0):
        values = [cosine_fade(i, 10, exponent) for i in range(11)]
        assert values[0] == 1 and values[-1] == pytest.approx(0) and values == sorted(values, reverse=True)
    assert cosine_fade(5, 10, 3.0) == pytest.approx(cosine_fade(5, 10, 1.0) ** 3) == pytest.approx(0.125)


@settings(max_examples=100, deadline=None)
@given(height=st.integers(1, 40), width=st.integers(1, 40), stride=st.integers(1, 5))
def test_dilated_views_cover_every_canvas_pixel_exactly_once(height, width, stride):
    canvas = torch.arange(height * width, dtype=torch.float64).reshape(1, 1, height, width)
    views = deinterleave(canvas, stride)
    grid = view_grid(height, width, stride)
    assert (grid.height, grid.width) == views.shape[2:]
    hits = torch.zeros(height * width)
    for tile in grid:
        view = views[(..., *tile.slices)]
        dy, dx = tile.y // tile.h, tile.x // tile.w
        rows, cols = range(dy, height, stride), range(dx, width, stride)
        own = view[0, 0, : len(rows), : len(cols)]  # the rest is edge padding of a canvas not divisible by s
        assert torch.equal(own, canvas[0, 0, dy::stride, dx::stride])
        hits[own.long().flatten()] += 1
    assert (hits == 1).all()
    assert torch.equal(interleave(views, stride, height, width), canvas)


def test_a_view_is_a_sub_lattice_of_the_whole_picture():
    canvas = torch.randn(1, 4, 64, 96)
    views = deinterleave(canvas, 4)
    assert views.shape == (1, 4, 64, 96) and torch.equal(views[..., 16:32, 24:48], canvas[..., 1::4, 1::4])


def test_enlarge_on_a_ring_continues_across_the_edges():
    image = torch.rand(1, 3, 16, 24) * 2 - 1
    ring = enlarge(image, 32, 48, (True, True))
    flat = enlarge(image, 32, 48, (False, False))
    assert ring.shape == flat.shape == (1, 3, 32, 48)
    assert torch.allclose(ring[..., 8:-8, 8:-8], flat[..., 8:-8, 8:-8], atol=1e-6)  # same inside
    rolled = enlarge(image.roll(3, dims=3), 32, 48, (True, True))  # a ring has no first column
    assert torch.allclose(rolled, ring.roll(6, dims=3), atol=1e-5)


BASE = {"prompt": "a castle on a hill", "size": "1152x640", "steps": 3, "guidance": 7.5, "seed": 2,
        "scheduler": "ddim", "tile_batch": 8}  # fmt: skip


def run(backend, **changes):
    return generate_result(model=backend, **{**BASE, **changes})


def resolved(info, **changes):
    return settings_for(RunRequest(**{**BASE, **changes}), info)[1]


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_auto_coherence_is_progressive_beyond_twice_the_native_size_only(sd_backend):
    info = sd_backend.info  # native 512 px
    assert resolved(info).coherence == "progressive"
    assert resolved(info, size="1024x1024").coherence == "none"
    assert resolved(info, size="2048x512").coherence == "none"  # no stage to make
    assert resolved(info, coherence="none").coherence == "none"


def test_progressive_run_makes_its_stages_at_a_linear_cost(sd_backend):
    result = run(sd_backend)
    assert result.settings.coherence == "progressive" and result.latents.shape == (1, 4, 80, 144)
    assert torch.isfinite(result.latents).all()
    plain = run(sd_backend, coherence="none")
    # first stage 72x40 latent: 2 tiles, 1 call per step; second: 6 local tiles and 4 views, 8 per call: 2 calls
    assert (plain.run.model_calls, result.run.model_calls) == (3, 3 * 1 + 3 * 2)


@pytest.mark.slow
def test_a_stage_follows_its_reference_more_the_slower_the_skip_residual_fades(sd_backend):
    from gigadiff.events import NullListener
    from gigadiff.executors.local import LocalExecutor
    from gigadiff.recipes.coherence import _stage
    from gigadiff.recipes.context import RunContext

    stage = resolved(sd_backend.info, size="1024x1024", steps=4, coherence="none")
    ctx = RunContext(sd_backend, stage, LocalExecutor(8), NullListener(), VaeTiling())
    smooth = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = torch.nn.functional.interpolate(smooth, size=(128, 128), mode="bicubic")
    follow = {}
    for exponent in (1.0, 3.0):
        staged = _stage(ctx, reference, 1, [], skip_exponent=exponent)
        follow[exponent] = corr(staged.latents, reference)
        assert staged.model_calls == 4 * (2 + 1)  # 9 local tiles and 4 views per step, 8 per call
    plain = run(sd_backend, size="1024x1024", steps=4, coherence="none").latents
    assert follow[1.0] > follow[3.0] > abs(corr(plain, reference)) + 0.2


def test_explicit_progressive_is_refused_where_it_cannot_work(sd_backend):
    cases = [({"coherence": "progressive", "size": "2048x512"}, "shorter side must exceed"),
             ({"coherence": "sideways"}, "coherence must be one of")]  # fmt: skip
    for changes, message in cases:
        with pytest.raises(GigadiffError, match=message):
            resolved(sd_backend.info, **changes)


@pytest.mark.slow
def test_regions_act_on_every_stage_and_views(sd_backend):
    """A region over the whole canvas with its own prompt equals a plain progressive run with that prompt."""
    whole = {"feather": 0, "regions": [{"prompt": "a red barn", "box": [0.0, 0.0, 1.0, 1.0]}]}
    regional = run(sd_backend, regions=whole)
    plain = run(sd_backend, prompt="a red barn")
    assert regional.settings.coherence == "progressive"
    assert (regional.latents - plain.latents).abs().max() <= 1e-3 * plain.latents.abs().max()
    mixed = run(sd_backend, regions=[{"prompt": "a red barn", "box": [0.0, 0.0, 0.5, 1.0]}]).latents
    left, right = mixed[..., :60] - plain.latents[..., :60], mixed[..., 84:] - plain.latents[..., 84:]
    assert left.abs().mean() < 0.2 * right.abs().mean() + 1e-3  # the barn's side follows the barn's prompt


def test_an_init_image_starts_every_stage(sd_backend, tmp_path):
    from PIL import Image

    photo = tmp_path / "p.png"
    Image.effect_noise((1152, 640), 40).convert("RGB").save(photo)
    result = run(sd_backend, coherence="progressive", init=str(photo), strength=0.5, steps=4)
    assert result.settings.coherence == "progressive" and result.latents.shape == (1, 4, 80, 144)
    # each stage runs the last 2 of its 4 steps: stage 0 (2 tiles, 1 call), stage 1 (6 local + 4 views, 2 calls)
    assert result.run.model_calls == 2 * 1 + 2 * 2 and result.run.steps.first == 2
    assert torch.isfinite(result.latents).all()


def test_the_skip_residual_pulls_once_per_step_also_with_a_second_order_scheduler(sd_backend, monkeypatch):
    """Heun evaluates the model twice per step (3 evaluations for 2 steps) and makes the step's update from the
    state at its start: the skip residual is applied there, twice, never to the corrector's model input."""
    from gigadiff.recipes import coherence

    calls = []
    pull = coherence.SkipResidual.__call__

    def counted(self, step, latents):
        calls.append((step, bool(self.scheduler.state_in_first_order)))
        return pull(self, step, latents)

    monkeypatch.setattr(coherence.SkipResidual, "__call__", counted)
    result = run(sd_backend, scheduler="heun", steps=2)
    assert result.settings.coherence == "progressive" and torch.isfinite(result.latents).all()
    assert [step for step, _ in calls] == [0, 2] and all(first for _, first in calls)
