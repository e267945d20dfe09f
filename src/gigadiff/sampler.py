"""The denoising loop over one latent canvas.

At every step: scale the canvas for the scheduler, let the model predict on every tile of this step's grid,
fuse the tile predictions into one canvas prediction, and take ONE scheduler step on the whole canvas.
Because fusion happens on the prediction (not on stepped latents), the scheduler only ever sees a canvas and
any diffusers scheduler, multistep or stochastic, works unchanged. The sampler knows nothing of model
families: the backend is reached only through `CanvasDenoiser`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gigadiff import interrupts
from gigadiff.backends.base import Backend
from gigadiff.events import Listener, NullListener
from gigadiff.executors.local import TileExecutor
from gigadiff.fusion import FusionAccumulator, gather_tile
from gigadiff.geometry import GridPlan, TileGrid
from gigadiff.schedulers import model_input


@dataclass(frozen=True)
class Layer:
    """One more conditioning heard on part of the canvas (a regional prompt): its weight per latent pixel."""

    cond: Any
    weight: torch.Tensor
    """[H, W] in [0, 1]; tiles where it is at most `skip_below` everywhere are not evaluated for this layer."""
    skip_below: float = 0.0


def touched(grid: TileGrid, layer: Layer) -> TileGrid:
    """The tiles of `grid` on which `layer` has some weight (a layer costs model calls only where it paints)."""
    keep = tuple(t for t in grid if float(gather_tile(layer.weight, t).max()) > layer.skip_below)
    return TileGrid(grid.height, grid.width, keep, grid.wrap)


@dataclass
class CanvasDenoiser:
    """The model as the sampler sees it: a canvas in, a fused canvas-sized prediction out.

    With `layers` (regional prompts, the background's prompt among them), the layers replace `cond`: each
    layer is evaluated on the tiles its weight touches, and the predictions are fused pixel by pixel with the
    layers' weights times the tile windows.
    """

    backend: Backend
    cond: Any
    executor: TileExecutor
    plan: GridPlan
    weights: str
    margin: int = 0
    """Tile rim, in latent pixels, that the backend's model is not trusted on (see fusion)."""
    layers: Sequence[Layer] = ()
    model_calls: int = 0
    evaluated_pixels: int = 0

    def passes(self, grid: TileGrid) -> list[tuple[Any, TileGrid, torch.Tensor | None]]:
        """(conditioning, tiles, weight) for every model pass of a step on `grid`."""
        if not self.layers:
            return [(self.cond, grid, None)]
        return [(layer.cond, part, layer.weight) for layer in self.layers if len(part := touched(grid, layer))]

    def __call__(self, x: torch.Tensor, t: Any, step: int, grid: TileGrid, listener: Listener) -> torch.Tensor:
        acc = FusionAccumulator(x.shape, self.weights, x.device, self.margin)
        for cond, part, weight in self.passes(grid):
            for batch in self.executor.predictions(self.backend, x, t, cond, part):
                interrupts.check()
                acc.add_batch(batch.tiles, batch.predictions, weight)
                self.model_calls += batch.calls
                listener.on_tiles_done(len(batch.tiles))
            self.evaluated_pixels += part.evaluated_pixels
        return acc.result()


class Denoiser(Protocol):
    """What `sample` steps with: a fused canvas prediction per step (CanvasDenoiser, or one that wraps it)."""

    @property
    def plan(self) -> GridPlan: ...
    def passes(self, grid: TileGrid) -> list[tuple[Any, TileGrid, torch.Tensor | None]]: ...
    def __call__(self, x: torch.Tensor, t: Any, step: int, grid: TileGrid, listener: Listener) -> torch.Tensor: ...


def starts_a_step(scheduler: Any) -> bool:
    """Whether the scheduler's next evaluation starts a step (not a second-order scheduler's second one)."""
    return bool(getattr(scheduler, "state_in_first_order", True))


def sample(
    denoiser: Denoiser,
    scheduler: Any,
    latents: torch.Tensor,
    timesteps: Sequence[Any],
    step_kwargs: dict[str, Any],
    listener: Listener | None = None,
    first_step: int = 0,
    guide: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    counted_from: int | None = None,
) -> torch.Tensor:
    """Run `scheduler` over `timesteps`, starting at index `first_step` (for resumed runs).

    `counted_from`: the step listeners count the run's steps from (default `first_step`): an img2img run's
    start, so that a resumed run goes on counting ("step 16/20") rather than counting from where it resumed.

    `guide(i, latents)`, when given, may change the latents before step i (progressive coherence's skip
    residual); the scheduler then steps from what it returns. It is applied where a step starts: a second-order
    scheduler's second evaluation (Heun's corrector) sees the scheduler's own intermediate latents, unchanged,
    since its update is made from the state at the step's start (a guide there would move the corrector's model
    input but not the update).
    """
    listener = listener or NullListener()
    for i in range(first_step, len(timesteps)):
        interrupts.check()
        t = timesteps[i]
        if guide is not None and starts_a_step(scheduler):
            latents = guide(i, latents)
        grid = denoiser.plan.grid(i)
        tiles = sum(len(part) for _, part, _ in denoiser.passes(grid))
        listener.on_step_start(i, len(timesteps), tiles, first_step if counted_from is None else counted_from)
        x_in = model_input(scheduler, latents, t)
        prediction = denoiser(x_in, t, i, grid, listener)
        latents = scheduler.step(prediction, t, latents, **step_kwargs, return_dict=False)[0]
        listener.on_step_end(i, latents)
    return latents
