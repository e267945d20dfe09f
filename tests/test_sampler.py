"""The synchronized tiled loop on canvases larger than a tile: every scheduler, batch-size independence."""

from __future__ import annotations

import pytest
import torch

from gigadiff.api import generate_result
from gigadiff.executors.local import LocalExecutor

BASE = {"prompt": "a mountain panorama", "size": "768x384", "steps": 3, "guidance": 7.5, "seed": 11, "tile": 256,
        "overlap": 64}  # fmt: skip


def run(backend, **changes):
    return generate_result(model=backend, **{**BASE, **changes})


EVALUATIONS = {"heun": 2 * 3 - 1, "pndm": 3 + 1}
"""Model evaluations of a 3-step schedule where it is not 3: Heun evaluates twice per step but the last, PNDM's
PLMS warm-up once more."""


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m", "unipc", "heun", "lcm", "pndm"])
def test_every_scheduler_runs_on_a_multi_tile_canvas(sd_backend, scheduler):
    result = run(sd_backend, scheduler=scheduler)
    assert result.latents.shape == (1, 4, 48, 96)
    assert torch.isfinite(result.latents).all()
    tiles = result.run.tiles_per_step
    assert tiles == 2 * 4  # 48 latent rows / 32-tile -> 2, 96 cols -> 4 with overlap 8
    evaluations = EVALUATIONS.get(scheduler, 3)
    assert result.run.evaluated_pixels == evaluations * tiles * 32 * 32
    assert result.run.model_calls == evaluations * 2  # 8 tiles per step in batches of 4
    assert result.run.steps.count == evaluations


@pytest.mark.parametrize("weights", ["uniform", "gaussian", "cosine"])
@pytest.mark.parametrize("shift", [True, False])
def test_result_does_not_depend_on_tile_batch(sd_backend, weights, shift):
    """Same tiles, same fusion order: only float32 rounding may differ.

    CPU (and CUDA) convolution kernels pick their blocking by batch size, so a tile computed in a batch of 8
    differs from the same tile computed alone in the last bits (~5e-6 relative for one call here); fusion and
    the scheduler are order-fixed, so nothing beyond that rounding, carried through the steps, may appear.
    """
    results = [
        run(sd_backend, tile_batch=n, weights=weights, shift=shift, scheduler="euler_a").latents for n in (1, 3, 8)
    ]
    scale = results[0].abs().max()
    for other in results[1:]:
        assert (other - results[0]).abs().max() <= 1e-5 * scale


def test_tile_batch_sets_the_number_of_model_calls(sd_backend):
    one = run(sd_backend, tile_batch=1)
    eight = run(sd_backend, tile_batch=8)
    assert one.run.model_calls == 3 * 8 and eight.run.model_calls == 3


def test_same_seed_same_image_other_seed_other_image(sd_backend):
    a, b, c = run(sd_backend).latents, run(sd_backend).latents, run(sd_backend, seed=12).latents
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.1


def test_shift_changes_the_result_but_not_the_cost(sd_backend):
    shifted, fixed = run(sd_backend, shift=True), run(sd_backend, shift=False)
    assert shifted.run.model_calls == fixed.run.model_calls
    assert shifted.run.evaluated_pixels == fixed.run.evaluated_pixels
    assert not torch.equal(shifted.latents, fixed.latents)


def test_sdxl_runs_tiled_with_crop_conditioning(sdxl_backend):
    result = run(sdxl_backend)
    assert result.latents.shape == (1, 4, 48, 96)
    assert torch.isfinite(result.latents).all()


def test_sdxl_tiles_are_conditioned_on_their_canvas_position(sdxl_backend):
    from gigadiff.geometry import Tile

    cond = sdxl_backend.condition("x", "", 7.5, (384, 768), {})
    ids = sdxl_backend.time_ids([Tile(0, 0, 32, 32), Tile(16, 64, 32, 32)], cond)
    assert ids.tolist() == [[384, 768, 0, 0, 256, 256], [384, 768, 128, 512, 256, 256]]


def test_executor_yields_tiles_in_grid_order_in_calls_of_one_shape(sd_backend):
    """14 tiles in batches of 4: four calls of exactly 4 tiles, the last filled up with copies of tile 13; each
    tile's prediction equals the one it gets in any other batch of that shape."""
    from gigadiff.geometry import tile_grid

    grid = tile_grid(48, 160, 32, 8)
    assert len(grid) == 14
    cond = sd_backend.condition("x", "", 7.5, (384, 1280), {})
    canvas = torch.randn(1, 4, 48, 160, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    shapes = []
    predict = sd_backend.predict

    def spy(x, *args):
        shapes.append(x.shape[0])
        return predict(x, *args)

    sd_backend.predict = spy
    try:
        batches = list(LocalExecutor(4).predictions(sd_backend, canvas, t, cond, grid))
        reversed_tiles = type(grid)(grid.height, grid.width, grid.tiles[::-1])
        backwards = list(LocalExecutor(4).predictions(sd_backend, canvas, t, cond, reversed_tiles))
    finally:
        del sd_backend.predict
    assert shapes == [4] * 8 and [b.calls for b in batches] == [1] * 4
    assert tuple(t for b in batches for t in b.tiles) == grid.tiles
    forward = torch.cat([b.predictions for b in batches])
    assert forward.shape == (14, 4, 32, 32)
    assert torch.equal(forward, torch.cat([b.predictions for b in backwards]).flip(0))
