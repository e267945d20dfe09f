"""Scheduler names users can ask for, mapped onto diffusers' scheduler classes.

gigadiff fuses the model's *prediction* and then takes one ordinary scheduler step on the whole canvas, so any
diffusers scheduler works unchanged, multistep ones included. Every scheduler is built `from_config` of the
model's own scheduler config, so the model's training schedule (betas, prediction type, timestep spacing)
is kept and only the solver changes.
"""

from __future__ import annotations

import inspect
from typing import Any

from gigadiff.errors import GigadiffError

# name -> (diffusers class name, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as Stable Diffusion ships it
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
SCHEDULER_NAMES = ("default", *SCHEDULERS)


def make_scheduler(name: str, base: Any) -> Any:
    """A fresh scheduler called `name`, configured from the model's scheduler `base`.

    "default" is a fresh copy of the model's own scheduler. A fresh object matters: schedulers carry state
    (step index, multistep history) that must not leak between generations.
    """
    if name == "default":
        return type(base).from_config(base.config)
    if name not in SCHEDULERS:
        raise GigadiffError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    return cls.from_config(base.config, **overrides)


def step_kwargs(scheduler: Any, generator: Any, eta: float = 0.0) -> dict[str, Any]:
    """Extra keyword arguments the scheduler's `step` accepts: `eta` (DDIM) and `generator` (stochastic ones)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs
