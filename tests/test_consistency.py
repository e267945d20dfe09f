"""Multistep consistency sampling as a scheduler."""

from __future__ import annotations

import pytest
import torch

from gigadiff.consistency import ConsistencyScheduler, floored_sigmas, karras_sigmas
from gigadiff.schedulers import make_scheduler


def test_schedules():
    assert karras_sigmas(1, 0.002, 80) == [80.0]
    two = karras_sigmas(2, 0.002, 80)
    assert two[0] == 80 and two[1] == pytest.approx(2.5152, abs=1e-3)
    assert floored_sigmas(1, 20, 80) == [80.0]
    assert floored_sigmas(2, 20, 80) == [80.0, 20.0]
    four = floored_sigmas(4, 20, 80)
    assert four[0] == 80 and four[-1] == 20 and four == sorted(four, reverse=True)


def test_step_renoises_to_the_next_level_and_returns_x0_at_the_end():
    sched = ConsistencyScheduler(sigma_min=0.002, sigma_max=80.0)
    sched.set_timesteps(sigmas=[80.0, 10.0])
    x0 = torch.zeros(1, 1, 256, 256)
    g = torch.Generator().manual_seed(0)
    noisy = sched.step(x0, sched.timesteps[0], x0 * 0, generator=g, eta=1.0).prev_sample
    assert noisy.std() == pytest.approx((10.0**2 - 0.002**2) ** 0.5, rel=0.02)
    last = sched.step(x0 + 1, sched.timesteps[1], noisy, generator=g).prev_sample
    assert torch.equal(last, x0 + 1)
    assert sched.init_noise_sigma == 80.0 and torch.equal(sched.scale_model_input(noisy), noisy)


def test_default_scheduler_is_a_fresh_copy():
    base = ConsistencyScheduler(sigma_floor=20.0)
    fresh = make_scheduler("default", base)
    assert fresh is not base and fresh.config.sigma_floor == 20.0
    fresh.set_timesteps(3)
    assert fresh.timesteps.tolist()[0] == 80.0 and fresh.timesteps.tolist()[-1] == 20.0


def test_bad_schedules():
    sched = ConsistencyScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps()
    with pytest.raises(ValueError, match="positive and finite"):
        sched.set_timesteps(sigmas=[80.0, -1.0])


def test_eta_zero_keeps_the_noise_direction():
    sched = ConsistencyScheduler()
    sched.set_timesteps(sigmas=[80.0, 20.0])
    eps = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    x0 = torch.full((1, 1, 64, 64), 0.3)
    nxt = sched.step(x0, 80.0, x0 + 80.0 * eps, eta=0.0).prev_sample
    spread = (20.0**2 - 0.002**2) ** 0.5
    assert torch.allclose(nxt, x0 + spread * eps, atol=1e-5)
    with pytest.raises(ValueError, match="eta must lie in"):
        ConsistencyScheduler().step(x0, 80.0, x0, eta=2.0)
