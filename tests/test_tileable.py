"""Tileable output: the canvas is a torus for the denoiser and for the VAE, so the image continues across its edges."""

from __future__ import annotations

import torch

from gigadiff.executors.local import LocalExecutor
from gigadiff.geometry import GridPlan
from gigadiff.sampler import CanvasDenoiser, sample
from gigadiff.schedulers import make_scheduler, step_kwargs


def torus_run(backend, latents: torch.Tensor, wrap: tuple[bool, bool]) -> torch.Tensor:
    cond = backend.condition("a stone wall", "", 5.0, (384, 384), {})
    plan = GridPlan(48, 48, tile=32, overlap=8, shifted=False, wrap=wrap)  # ring of 2 windows, starts 12 and 36
    scheduler = make_scheduler("euler", backend.base_scheduler)
    scheduler.set_timesteps(3)
    denoiser = CanvasDenoiser(backend, cond, LocalExecutor(4), plan, "gaussian")
    out = sample(denoiser, scheduler, latents * scheduler.init_noise_sigma, scheduler.timesteps,
                 step_kwargs(scheduler, None))  # fmt: skip
    return out


def test_a_wrapped_canvas_has_no_edges_rolling_the_noise_by_one_spacing_rolls_the_image(sd_backend):
    """On a torus every window sees what its neighbour saw before the roll: the result is the rolled result.

    On a clamped canvas the edge windows see different content after a roll, so the property is specific to
    wrapping (checked too, so the test cannot pass by accident).
    """
    noise = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(0))
    rolled_noise = noise.roll((24, 24), dims=(2, 3))
    torus = torus_run(sd_backend, noise, (True, True))
    torus_rolled = torus_run(sd_backend, rolled_noise, (True, True))
    assert torch.allclose(torus_rolled, torus.roll((24, 24), dims=(2, 3)), atol=1e-4)
    flat = torus_run(sd_backend, noise, (False, False))
    flat_rolled = torus_run(sd_backend, rolled_noise, (False, False))
    assert not torch.allclose(flat_rolled, flat.roll((24, 24), dims=(2, 3)), atol=1e-2)


def test_only_the_wrapped_axis_is_a_ring(sd_backend):
    noise = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(1))
    base = torus_run(sd_backend, noise, (False, True))
    across_x = torus_run(sd_backend, noise.roll(24, dims=3), (False, True))
    assert torch.allclose(across_x, base.roll(24, dims=3), atol=1e-4)
    across_y = torus_run(sd_backend, noise.roll(24, dims=2), (False, True))
    assert not torch.allclose(across_y, base.roll(24, dims=2), atol=1e-2)


def test_tileable_cli_run_records_it_and_its_image_continues_across_its_edges(tiny_sd_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from gigadiff.cli import with_implied_values
    from gigadiff.io.writers import read_png_metadata
    from gigadiff.metrics import edge_continuity
    from tests.test_cli import invoke, tiny_args

    assert with_implied_values(["generate", "--tileable"]) == ["generate", "--tileable", "both"]
    assert with_implied_values(["generate", "--tileable", "a wall"]) == ["generate", "--tileable", "both", "a wall"]
    assert with_implied_values(["generate", "--tileable", "x", "-q"]) == ["generate", "--tileable", "x", "-q"]
    assert with_implied_values(["generate", "--tileable", "z"]) == ["generate", "--tileable", "z"]
    typo = invoke(*with_implied_values(["generate", "x", "--model", str(tiny_sd_dir), "--tileable", "z"]))
    assert typo.exit_code == 2 and "--tileable must be one of none, x, y, both, got 'z'" in typo.output
    out = tmp_path / "wall.png"
    result = invoke(*with_implied_values([*tiny_args(tiny_sd_dir, out), "--tileable"]))
    assert result.exit_code == 0, result.output
    assert read_png_metadata(out)["tileable"] == "both"
    with Image.open(out) as im:
        edges = edge_continuity(np.asarray(im, dtype=np.float64))
    assert max(edges.x, edges.y) < 1.5
    bad = invoke(*tiny_args(tiny_sd_dir, tmp_path / "bad.png"), "--tileable", "z")
    assert bad.exit_code == 2 and "tileable must be one of none, x, y, both, got 'z'" in bad.output
