"""What a run tells whoever is watching it: one listener protocol for every phase (loading, denoising, VAE,
writing), heard by progress bars, checkpoint writers, previews and the service's job records.

A listener given by a caller (the Python API's `listener=`) may implement only the events it cares about: the
run layer wraps it once in `Listeners`, which forwards each event to those that have it, and every layer below
receives a complete `Listener` (no layer checks for None or for a missing method).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class Listener(Protocol):
    """Progress events of a run (see `NullListener`, which hears them all and does nothing).

    on_phase starts a phase of the run (a coherence stage, the VAE decode, writing) of `total` units (None: not
    counted) and on_advance counts them; the denoising loop reports steps and tiles."""

    def on_phase(self, name: str, total: int | None) -> None: ...
    def on_advance(self, count: int) -> None: ...
    def on_step_start(self, step: int, total_steps: int, tiles: int, first_step: int = 0) -> None: ...
    def on_tiles_done(self, count: int) -> None: ...
    def on_step_end(self, step: int, latents: torch.Tensor) -> None: ...


EVENTS = ("on_phase", "on_advance", "on_step_start", "on_tiles_done", "on_step_end")


class NullListener:
    """Hears every event and does nothing: the base of listeners that care about some of them."""

    def on_phase(self, name: str, total: int | None) -> None:
        pass

    def on_advance(self, count: int) -> None:
        pass

    def on_step_start(self, step: int, total_steps: int, tiles: int, first_step: int = 0) -> None:
        pass

    def on_tiles_done(self, count: int) -> None:
        pass

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        pass


class Listeners(NullListener):
    """Several listeners heard as one (e.g. a progress bar and a checkpoint writer); each hears the events it
    implements (a caller's listener may implement any subset of `EVENTS`, None stands for no listener)."""

    def __init__(self, *listeners: Any):
        self.listeners = [x for x in listeners if x is not None]
        self._heard = {event: [getattr(x, event) for x in self.listeners if callable(getattr(x, event, None))]
                       for event in EVENTS}  # fmt: skip

    def on_phase(self, name: str, total: int | None) -> None:
        for heard in self._heard["on_phase"]:
            heard(name, total)

    def on_advance(self, count: int) -> None:
        for heard in self._heard["on_advance"]:
            heard(count)

    def on_step_start(self, step: int, total_steps: int, tiles: int, first_step: int = 0) -> None:
        for heard in self._heard["on_step_start"]:
            heard(step, total_steps, tiles, first_step)

    def on_tiles_done(self, count: int) -> None:
        for heard in self._heard["on_tiles_done"]:
            heard(count)

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        for heard in self._heard["on_step_end"]:
            heard(step, latents)
