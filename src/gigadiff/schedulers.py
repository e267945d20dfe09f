"""Scheduler names users can ask for, mapped onto diffusers' scheduler classes for each kind of model.

gigadiff fuses the model's *prediction* and then takes one ordinary scheduler step on the whole canvas, so any
diffusers scheduler works unchanged, multistep ones included. Every scheduler is built `from_config` of the
model's own scheduler config, so the model's training schedule (betas, prediction type, timestep spacing, flow
shift) is kept and only the solver changes.

The same name means the same solver on every kind of model where it exists: on a flow-matching model
`euler` is FlowMatchEuler, `dpmpp_2m` is DPM-Solver++ with flow sigmas, `unipc` is UniPC with flow sigmas.
Names without a flow-matching form (DDIM, PNDM, ...) are refused on a flow model before its weights load
(`check_scheduler`); a consistency model has exactly one sampler. Torch-free at import: the names are
checked before a model is loaded.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any

from gigadiff.errors import GigadiffError

if TYPE_CHECKING:
    import torch

    from gigadiff.facts import SchedulerKind

# name -> (diffusers class name, config overrides)
DDPM_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
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
_FLOW_SOLVER = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": False}),
    "euler_a": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, **_FLOW_SOLVER}),
    "dpmpp_2m_sde": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **_FLOW_SOLVER},
    ),
    "unipc": ("UniPCMultistepScheduler", _FLOW_SOLVER),
    "deis": ("DEISMultistepScheduler", _FLOW_SOLVER),
    "lcm": ("FlowMatchLCMScheduler", {}),
}
SCHEDULER_NAMES = ("default", *DDPM_SCHEDULERS)
"""Every name any model accepts (the flow names are a subset)."""
TABLES: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {"ddpm": DDPM_SCHEDULERS, "flow": FLOW_SCHEDULERS,
                                                               "consistency": {}}  # fmt: skip


def names_for(kind: SchedulerKind) -> tuple[str, ...]:
    return ("default", *TABLES[kind])


def check_scheduler(name: str, kind: SchedulerKind | None = None, model: str = "") -> None:
    """Refuse an unknown name, or one this kind of model cannot use, naming the names that work."""
    if name not in SCHEDULER_NAMES:
        raise GigadiffError(f"unknown {{scheduler}} {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)}", "scheduler")
    if kind is None or name in names_for(kind):
        return
    if kind == "consistency":
        raise GigadiffError(f"model {model!r} has its own sampler; {{scheduler}} must be 'default'", "scheduler")
    what = {"flow": "flow-matching", "ddpm": "DDPM-family"}[kind]
    raise GigadiffError(
        f"{{scheduler}} {name!r} has no {what} form, and model {model!r} is a {what} model; "
        f"choose one of: {', '.join(names_for(kind))}",
        "scheduler",
    )


def make_scheduler(name: str, base: Any, kind: SchedulerKind = "ddpm", mu: float | None = None) -> Any:
    """A fresh scheduler called `name`, configured from the model's scheduler `base`.

    "default" is a fresh copy of the model's own scheduler. A fresh object matters: schedulers carry state
    (step index, multistep history) that must not leak between generations. On a flow model, `mu` (the run's
    timestep shift) is given to solvers that take it in their config rather than in `set_timesteps`.
    """
    check_scheduler(name, kind)
    overrides: dict[str, Any]
    if name == "default":
        cls, overrides = type(base), {}
    else:
        import diffusers

        class_name, overrides = TABLES[kind][name]
        cls = getattr(diffusers, class_name)
    overrides = dict(overrides)
    if kind == "flow":
        overrides.update(_flow_config(cls.__name__, base.config, mu))
    return cls.from_config(base.config, **overrides)


def _flow_config(class_name: str, base: Any, mu: float | None) -> dict[str, Any]:
    """The model's flow shift, carried over to a solver whose config names it differently.

    A dynamically shifting model gets this run's `mu` at `set_timesteps` (`takes_mu`), except in FlowMatchHeun,
    which takes only a fixed shift: exp(mu), the same schedule. A fixed-shift model keeps its shift, or takes
    exp(mu) when the run overrides it.
    """
    dynamic = bool(base.get("use_dynamic_shifting", False))
    shift = float(base.get("shift", base.get("flow_shift", 1.0)))
    if mu is not None and (not dynamic or class_name == "FlowMatchHeunDiscreteScheduler"):
        shift, dynamic = math.exp(mu), False
    if class_name == "FlowMatchHeunDiscreteScheduler":
        return {"shift": shift}
    if class_name.startswith("FlowMatch"):
        return {"shift": shift, "use_dynamic_shifting": dynamic}
    out: dict[str, Any] = {"flow_shift": shift, "use_dynamic_shifting": dynamic}
    if dynamic:
        out["time_shift_type"] = "exponential"
    return out


def takes_mu(scheduler: Any) -> bool:
    """Whether `set_timesteps` expects this run's mu (dynamic shifting on)."""
    return bool(scheduler.config.get("use_dynamic_shifting", False)) and "mu" in set(
        inspect.signature(scheduler.set_timesteps).parameters
    )


def takes_sigmas(scheduler: Any) -> bool:
    """Whether `set_timesteps` accepts an explicit sigma schedule (flow solvers with their own flow sigmas don't
    need one: diffusers' flow pipelines pass none to them)."""
    if scheduler.config.get("use_flow_sigmas", False):
        return False
    return "sigmas" in set(inspect.signature(scheduler.set_timesteps).parameters)


def model_input(scheduler: Any, latents: torch.Tensor, t: Any) -> torch.Tensor:
    """The canvas as the model should see it at `t` (EDM-style schedulers scale it; flow schedulers do not)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return latents if scale is None else scale(latents, t)


def step_kwargs(scheduler: Any, generator: Any, eta: float = 0.0) -> dict[str, Any]:
    """Extra keyword arguments the scheduler's `step` accepts: `eta` (DDIM) and `generator` (stochastic ones)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs
