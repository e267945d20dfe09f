"""What every diffusers-pipeline adapter shares: device and dtype, schedulers, the codec, guidance plumbing.

A family adapter subclasses `DiffusersBackend`, encodes prompts in `condition`, runs its denoiser in
`predict_branch` (one guidance pass) and, where it can batch both passes into one call, in `predict`; its
`combine` is its pipeline's guidance formula. Torch-free at import (gigadiff.lazy).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from gigadiff.backends.codec import VaeCodec
from gigadiff.backends.device import dtype_name
from gigadiff.backends.flow import set_flow_timesteps
from gigadiff.backends.pipelines import weights_fingerprint
from gigadiff.backends.placement import activate, execution_device, offloading
from gigadiff.backends.quantized import describe_quantization
from gigadiff.facts import ModelInfo
from gigadiff.lazy import no_grad, torch
from gigadiff.schedulers import make_scheduler

if TYPE_CHECKING:
    import torch as torch_types

    from gigadiff.backends.control import Control
    from gigadiff.geometry import Tile


class DiffusersBackend:
    """Base of the diffusers adapters (see the module docstring). `denoiser`: the pipeline's UNet/transformer."""

    def __init__(self, pipe: Any, info: ModelInfo, denoiser: Any):
        self.pipe = pipe
        self.denoiser = denoiser
        self.offload = offloading(pipe)
        self.device = execution_device(pipe, denoiser)
        self.dtype = denoiser.dtype
        self.base_scheduler = pipe.scheduler
        quantization = describe_quantization(denoiser)
        self.info = replace(info, fingerprint=weights_fingerprint(denoiser, pipe.vae, quantization=quantization))
        self.codec = self.make_codec()
        self.controlnets: dict[str, Any] = {}
        """ControlNet models loaded beside the pipeline, by the name the run gives them (gigadiff.backends.control)."""
        self.timesteps: list[float] = []
        """The timesteps of the last schedule made (`scheduler`): where a step falls in its run."""
        self._pass_memo: dict[Any, Any] | None = None
        self.setup: dict[str, Any] = {"dtype": dtype_name(self.dtype), "offload": self.offload, **quantization}
        """What the metadata records of how the model runs (gigadiff.backends.base.Backend.setup)."""

    park_device: str | None = None
    """Where the text encoders wait while they are not encoding ("cpu" for a pipeline gigadiff loaded onto a
    GPU; None: they stay where they are, as in a pipeline the caller passed in)."""

    def park_text_encoders(self, where: str) -> None:
        """Keep the text encoders on `where` between encodings (nothing to do when that is the device, or when
        offload hooks move them)."""
        self.park_device = where if torch.device(where) != self.device and self.offload == "none" else None

    def text_encoders(self) -> list[Any]:
        return [m for name, m in self.pipe.components.items()
                if name.startswith("text_encoder") and isinstance(m, torch.nn.Module)]  # fmt: skip

    @contextlib.contextmanager
    def encoding(self) -> Iterator[None]:
        """The text encoders on the device only while they encode: prompts are encoded before denoising, so the
        denoising phase holds the denoiser, the canvas and a tile batch, not T5-XXL's 9.5 GB (bf16) beside them."""
        parked = self.park_device is not None and torch.device(self.park_device) != self.device
        encoders = self.text_encoders() if parked else []
        for module in encoders:
            module.to(self.device)
        try:
            yield
        finally:
            for module in encoders:
                module.to(self.park_device)
            if encoders and self.device.type == "cuda":
                torch.cuda.empty_cache()

    def make_codec(self) -> VaeCodec:
        return VaeCodec(self.pipe.vae, self.device, self.info.vae_engine, self.vae_networks(),
                        sample_posterior=self.samples_posterior, activate=self.activate_vae)  # fmt: skip

    def activate_vae(self) -> None:
        """The VAE whole on the device before a VAE phase (model offloading: the denoiser off it)."""
        activate(self.pipe, self.pipe.vae)

    samples_posterior = True
    """Whether the family's img2img pipeline draws the init image's latents from the VAE's posterior (SD, FLUX.1)
    or takes its mode."""

    def vae_networks(self) -> Any:
        """What the VAE's engine needs beside the VAE (the halo engine: its decoder and encoder networks)."""
        return None

    def scheduler(self, name: str, steps: int, sigmas: Sequence[float] | None, mu: float | None) -> Any:
        scheduler = make_scheduler(name, self.base_scheduler, self.info.scheduler_kind, mu)
        if self.info.scheduler_kind == "flow":
            set_flow_timesteps(scheduler, steps, sigmas, mu, self.device, self.default_sigmas, self.always_sigmas)
        elif sigmas:
            scheduler.set_timesteps(sigmas=list(sigmas), device=self.device)
        else:
            scheduler.set_timesteps(steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        self.timesteps = [float(t) for t in scheduler.timesteps]
        return scheduler

    def step_index(self, t: Any) -> int:
        """The index of timestep `t` in the last schedule made (the nearest, for a solver's intermediate times)."""
        value = float(t)
        return min(range(len(self.timesteps)), key=lambda i: abs(self.timesteps[i] - value), default=0)

    def add_controlnets(self, models: Mapping[str, Any]) -> None:
        """ControlNets loaded with the pipeline, by the names the runs give them (families adapt them here to
        what their pipelines give their nets)."""
        self.controlnets.update(models)

    def acting(self, controls: Sequence[Control], t: Any) -> list[Control]:
        """The ControlNets acting at timestep `t` (within their window of the schedule, counted as the pipelines
        count steps)."""
        index, steps = self.step_index(t), max(1, len(self.timesteps))
        return [c for c in controls if c.acts(index, steps)]

    def drawn_like(self, cond: Any, drawn: Any) -> Any:
        """`cond` holding what `drawn` (a conditioning of the same run, after `drawn_conditioning`) drew: a region's
        conditioning shares the run's encoded control images instead of encoding them again. `cond` itself when it
        holds no ControlNets."""
        return replace(cond, controls=drawn.controls) if getattr(cond, "controls", ()) else cond

    always_sigmas = False
    """Whether the family's pipeline gives its sigma schedule to every solver that accepts one (Z-Image), or
    only to those without their own flow sigmas (FLUX)."""

    def default_sigmas(self, steps: int) -> list[float] | None:
        """A flow family's default sigma schedule (the FLUX pipelines': 1 down to 1/steps; None: the scheduler's
        own, for pipelines that give none)."""
        from gigadiff.backends.flow import linspace_sigmas

        return linspace_sigmas(steps)

    def condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> Any:  # fmt: skip
        raise NotImplementedError

    def drawn_conditioning(self, cond: Any, generator: Any, tiling: Any, listener: Any = None) -> Any:
        return cond

    def planned_condition(
        self, prompt: str, negative_prompt: str, guidance: float | None, canvas_px: tuple[int, int],
        options: Mapping[str, Any],
    ) -> Any:  # fmt: skip
        """`condition` on a pipeline built on the `meta` device (gigadiff.runs.plan): the same, except in families
        whose prompt encoding reads its data (attention masks' lengths), which give tensors of its shapes."""
        return self.condition(prompt, negative_prompt, guidance, canvas_px, options)

    def branches(self, cond: Any) -> int:
        return 2 if cond.cfg else 1

    def prompt_options(self) -> dict[str, Any]:
        """The arguments of the pipeline's `encode_prompt` that its `__call__` passes with defaults of its own
        (the prompt's length: Qwen-Image's pipeline cuts at 512 tokens where its encode_prompt would at 1024;
        SANA's instruction prefix): gigadiff encodes prompts as the pipeline does."""
        called = inspect.signature(type(self.pipe).__call__).parameters
        taken = inspect.signature(self.pipe.encode_prompt).parameters
        return {name: called[name].default for name in PROMPT_DEFAULTS if name in called and name in taken}

    # A family adapter says how to run its denoiser on tiles with one pass's inputs (`run`) and what those inputs
    # are (`branch_inputs`); guidance is written once, here: one call per pass, or both passes in one call of
    # twice the tiles where the family's pipeline batches them (`batches`), in its order (`guidance_order`).

    def branch_inputs(self, cond: Any, branch: int, tiles: Sequence[Tile]) -> Any:
        """The denoiser's inputs for one guidance pass (0: unconditional, 1: conditional) over `tiles`, batched
        per tile: tensors (first axis per tile), lists, dicts and tuples of them, and `Shared` values (the same
        for every tile, such as FLUX's text ids)."""
        raise NotImplementedError

    def run(self, x: torch_types.Tensor, t: Any, cond: Any, tiles: Sequence[Tile], inputs: Any) -> torch_types.Tensor:
        """The denoiser's float32 prediction for tiles x [N, C, h, w] with `inputs` (`branch_inputs`, or two
        passes' joined)."""
        raise NotImplementedError

    guidance_order: tuple[int, int] = (0, 1)
    """The order of the two passes in a batched call (diffusers' pipelines: unconditional first; Z-Image's:
    conditional first)."""

    def batches(self, cond: Any) -> bool:
        """Whether both guidance passes run in one call, as the family's pipeline runs them."""
        return True

    def one_call_per_tile(self, cond: Any) -> bool:
        """Whether every tile needs a call of its own (a denoiser that takes one set of canvas positions per call,
        with `--positions global`)."""
        return False

    def _calls(self, x: torch_types.Tensor, t: Any, cond: Any, tiles: Sequence[Tile],
               inputs: Any) -> torch_types.Tensor:  # fmt: skip
        """`run` on the tiles, in one call or (`one_call_per_tile`) one call per tile."""
        if self.one_call_per_tile(cond) and len(tiles) > 1:
            return torch.cat([self.run(x[i : i + 1], t, cond, tiles[i : i + 1], unshared(row(inputs, i)))
                              for i in range(len(tiles))])  # fmt: skip
        return self.run(x, t, cond, tiles, unshared(inputs))

    @no_grad
    def predict_branch(self, latent_tiles: torch_types.Tensor, t: Any, cond: Any, tiles: Sequence[Tile],
                       branch: int) -> torch_types.Tensor:  # fmt: skip
        return self._calls(latent_tiles, t, cond, tiles, self.branch_inputs(cond, branch, tiles))

    @no_grad
    def predict(self, latent_tiles: torch_types.Tensor, t: Any, cond: Any, tiles: Sequence[Tile]) -> torch_types.Tensor:
        if self.branches(cond) == 1:
            return self.predict_branch(latent_tiles, t, cond, tiles, 1)
        if not self.batches(cond):
            self._pass_memo = {}
            try:
                uncond = self.predict_branch(latent_tiles, t, cond, tiles, 0)
                return self.combine(uncond, self.predict_branch(latent_tiles, t, cond, tiles, 1), cond)
            finally:
                self._pass_memo = None
        first, second = self.guidance_order
        inputs = joined(self.branch_inputs(cond, first, tiles), self.branch_inputs(cond, second, tiles))
        both = self._calls(torch.cat([latent_tiles, latent_tiles]), t, cond, [*tiles, *tiles], inputs)
        out = dict(zip(self.guidance_order, both.chunk(2), strict=True))
        return self.combine(out[0], out[1], cond)

    def pass_shared(self, hidden: torch_types.Tensor, t: Any, tiles: Sequence[Tile], controls: Sequence[Control],
                    compute: Callable[[torch_types.Tensor, Sequence[Tile]], Any]) -> Any:  # fmt: skip
        """`compute(hidden, tiles)` for what does not depend on the guidance pass: the DiT ControlNet pipelines feed
        their nets the prompt (never the negative) and reuse the residuals in both passes. Computed once per tile:
        a call holding both passes (its halves the same tiles and latents) computes one half and repeats it; with
        the passes in calls of their own, the first pass's call computes and the other's reuses it (within one
        `predict`). Without `controls` acting at `t`, computed as it is (nothing to share, nothing compared)."""
        if not self.acting(controls, t):
            return compute(hidden, tiles)
        n = len(tiles)
        if n % 2 == 0 and list(tiles[: n // 2]) == list(tiles[n // 2 :]) and torch.equal(hidden[: n // 2],
                                                                                         hidden[n // 2 :]):  # fmt: skip
            return _doubled(compute(hidden[: n // 2], tiles[: n // 2]))
        if self._pass_memo is None:
            return compute(hidden, tiles)
        key = (float(t), tuple(tiles))
        if key not in self._pass_memo:
            self._pass_memo[key] = compute(hidden, tiles)
        return self._pass_memo[key]

    def combine(self, uncond: torch_types.Tensor, cond_out: torch_types.Tensor, cond: Any) -> torch_types.Tensor:
        """Classifier-free guidance: uncond + scale x (cond - uncond)."""
        return uncond + cond.scale * (cond_out - uncond)


def _doubled(values: Any) -> Any:
    """Every tensor of `values` (tensors, lists, tuples, dicts of them, None) repeated along its batch axis."""
    if values is None:
        return None
    if isinstance(values, dict):
        return {k: _doubled(v) for k, v in values.items()}
    if isinstance(values, (list, tuple)):
        return type(values)(_doubled(v) for v in values)
    if isinstance(values, torch.Tensor):
        return torch.cat([values, values])
    return values


PROMPT_DEFAULTS = ("max_sequence_length", "complex_human_instruction")


@dataclass(frozen=True)
class Shared:
    """A denoiser input that is the same for every tile of a call (not batched, not joined)."""

    value: Any


def joined(first: Any, second: Any) -> Any:
    """Two passes' inputs as one call's: tensors concatenated along their first axis, lists concatenated, dicts
    and tuples joined item by item, `Shared` values kept once, None kept."""
    if first is None or isinstance(first, Shared):
        return first
    if isinstance(first, dict):
        return {k: joined(v, second[k]) for k, v in first.items()}
    if isinstance(first, tuple):
        return tuple(joined(a, b) for a, b in zip(first, second, strict=True))
    if isinstance(first, list):
        return first + second
    return torch.cat([first, second])


def row(value: Any, i: int) -> Any:
    """Tile i's inputs of a call's (`Shared` values and None as they are)."""
    if value is None or isinstance(value, Shared):
        return value
    if isinstance(value, dict):
        return {k: row(v, i) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(row(v, i) for v in value)
    if isinstance(value, list):
        return value[i : i + 1]
    return value[i : i + 1]


def unshared(value: Any) -> Any:
    """One pass's inputs as a call takes them (`Shared` values unwrapped)."""
    if isinstance(value, Shared):
        return value.value
    if isinstance(value, dict):
        return {k: unshared(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(unshared(v) for v in value)
    return value


class TransformerBackend(DiffusersBackend):
    """Base of the DiT adapters: their denoiser is the pipeline's `transformer`."""

    def __init__(self, pipe: Any, info: ModelInfo):
        super().__init__(pipe, info, pipe.transformer)
        self.transformer = pipe.transformer


class NegativeGuided:
    """Mixin of a conditioning whose `negative` text is present exactly when classifier-free guidance runs."""

    negative: Any

    @property
    def cfg(self) -> bool:
        return self.negative is not None
