"""Tiled decode/encode for VAEs without image-wide statistics (Qwen-Image's, SANA's DC-AE): tiles with a halo of
the network's measured reach, attention layers summarised over the whole image first (gigadiff.vae.passes).

A family describes its VAE as two `Network`s (decoder and encoder): how to run one on a tile of its input, the
attention layers as `GlobalOp`s and how to hook them in. The result equals the whole-image pass up to float
rounding, except where fast mode pools a softmax attention's keys (tests and bench/vae.py measure both modes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gigadiff.errors import GigadiffError
from gigadiff.events import Listener, NullListener
from gigadiff.vae.budget import GB, MIN_TILE, USEFUL_TILE, available_ram, memory_budget, round_up
from gigadiff.vae.latents import posterior_latents, scale_latents, unscale_latents
from gigadiff.vae.passes import GlobalOp, Stage, TiledPass, execution_order, reach, stage_reach
from gigadiff.vae.plan import Plan
from gigadiff.vae.tiled import MAX_KEYS
from gigadiff.vae.tiles import Collector, TileSink, clamped
from gigadiff.vae.tiling import VaeTiling

ENGINE = "halo"
TILE_PX = {"cpu": 512, "cuda": 1024}
"""Largest tile cores in image px by device type (where the budget allows, and at least twice the halo): on the
CPU a tile's buffers should stay cache-sized, a GPU wants the larger call (the halo's share of the work falls as
the core grows)."""
KEEP_RAM = 0.25
"""Share of the available RAM that may hold the tiles' final stage outputs between passes (beyond it, a tile's
later passes run from its input again: slower, the same result)."""
HEADROOM = 1.5
"""A tile's device memory is estimated as this times its largest layer's input and output (measured on a probe,
per pixel): the input of the residual block around that layer stays alive beside them."""


@dataclass
class Network:
    """One direction of a VAE, as the tiled passes need it."""

    run: Callable[[torch.Tensor], torch.Tensor]
    """Input tile [B, C, h, w] -> output tile (the VAE's own latents or image, no diffusion-space scaling)."""
    ops: Sequence[GlobalOp]
    hooks: Callable[[], contextlib.AbstractContextManager[Any]]
    """While inside, the network's attention layers run through their ops."""
    channels: int
    scale: float
    """Output px per input px (the VAE factor when decoding, its inverse when encoding)."""
    align: int = 1
    """Input px that a crop's corner must be a multiple of (the encoder's total stride)."""
    posterior: bool = False
    """Whether the output is a posterior's moments (mean, logvar) rather than the latents themselves."""
    architecture: str = ""
    """What determines the reach (the VAE's class and config, and the direction); empty: measured every time."""
    fast_keys: Callable[[int | None], None] = field(default=lambda keys: None)
    """Sets the softmax attentions' key limit (None: every key, exact mode)."""
    stages: Sequence[Any] = ()
    """Modules on the network's path after which a tile's tensor can be cut down to what the rest needs (its
    resolution stages): the finer stages then run on little more than the core, and a tile's later passes may
    resume from their outputs (gigadiff.vae.passes.TiledPass)."""
    resumes: Sequence[Any] = ()
    """More modules on the path (blocks inside the stages) from whose output a tile's later passes may resume;
    their output is not cut (the stage before them cut it already to what the rest needs)."""
    module: Any = None
    """The torch module whose layers `run` runs (their activations are measured for the memory plan)."""
    _reach: tuple[int, list[Stage]] | None = None
    _bytes_per_px: float | None = None

    def halo(self, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> int:
        """The network's reach in input px (measured once per `architecture`, with its summaries held fixed:
        whether a change arrives does not depend on the weights' values)."""
        return self._measure(device, dtype)[0]

    def stage_halos(self, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> list[Stage]:
        """The stages in the order the network runs them, each with its reach from its output on."""
        return self._measure(device, dtype)[1]

    def _measure(self, device: Any, dtype: torch.dtype) -> tuple[int, list[Stage]]:
        if self._reach is None:
            key = (self.architecture, self.channels, self.scale)
            with self.hooks():
                points = [*self.stages, *self.resumes]
                self.ops, finished = execution_order(self.run, self.ops, self.channels, self.align, device, dtype,
                                                     points)  # fmt: skip
                if key not in _REACH or not self.architecture:
                    whole = reach(self.run, self.ops, self.channels, self.scale, self.align,
                                  start=max(32, 16 * self.align), device=device, dtype=dtype)  # fmt: skip
                    size = -(-(whole + 2 * self.align) // self.align) * self.align
                    stages = [stage_reach(self.run, self.ops, self.channels, self.scale, self.align, stage, size,
                                          device, dtype) for stage in self.stages]  # fmt: skip
                    _REACH[key] = (whole, stages)
            whole, per_stage = _REACH[key]
            cuts = [*per_stage, *(None for _ in self.resumes)]
            self._reach = (whole, [Stage(points[i], cuts[i], ops) for i, ops in finished])
        return self._reach

    def bytes_per_px(self, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> float:
        """Device bytes per input px² of a tile's crop: the largest input plus output of one of the network's
        layers on a probe input (measured once per `architecture`; activations grow with the crop's area)."""
        if self._bytes_per_px is None:
            key = (self.architecture, self.channels, self.scale, str(dtype))
            if key not in _MEMORY or not self.architecture:
                side = 32 * self.align
                largest = [0]

                def record(module: Any, args: Any, out: Any) -> None:
                    tensors = [*args, out]
                    size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
                    largest[0] = max(largest[0], size)

                leaves = [m for m in self.module.modules() if not any(m.children())]
                handles = [m.register_forward_hook(record) for m in leaves]
                try:
                    with self.hooks(), torch.no_grad():
                        self.run(torch.zeros(1, self.channels, side, side, device=device, dtype=dtype))
                finally:
                    for handle in handles:
                        handle.remove()
                _MEMORY[key] = largest[0] / side**2
            self._bytes_per_px = _MEMORY[key]
        return self._bytes_per_px


_REACH: dict[tuple[Any, ...], tuple[int, list[int]]] = {}
_MEMORY: dict[tuple[Any, ...], float] = {}


class HaloTiledVAE:
    """The "halo" engine (gigadiff.vae.engines): decode/encode of a VAE given as two `Network`s."""

    def __init__(self, vae: Any, decoder: Network, encoder: Network, tiling: VaeTiling | None = None,
                 listener: Listener | None = None, max_keys: int | None = None,
                 tile_px: int | None = None):  # fmt: skip
        self.vae, self.decoder, self.encoder = vae, decoder, encoder
        self.tiling = tiling or VaeTiling()
        self.listener = listener or NullListener()
        self.max_keys = None if self.tiling.mode == "exact" else (max_keys or MAX_KEYS)
        self.device = next(vae.parameters()).device
        self.dtype = next(vae.parameters()).dtype
        self.factor = round(decoder.scale)
        self.tile_px = tile_px or TILE_PX.get(self.device.type, TILE_PX["cuda"])
        """The largest tile cores in image px (the budget may make them smaller)."""
        self.last_plan: Plan | None = None

    def plan(self, batch: int, height: int, width: int, encoding: bool = False) -> Plan:
        """The largest core (whole MIN_TILE latent px, up to `tile_px`, or twice the halo) whose crop fits the
        budget with the attention layers' summaries; a budget that leaves no useful tile is refused."""
        network = self.encoder if encoding else self.decoder
        network.fast_keys(self.max_keys)
        halo = network.halo(self.device, self.dtype)
        per_px = batch * network.bytes_per_px(self.device, self.dtype)
        budget_bytes = memory_budget(self.tiling.memory_gb, self.device)
        step = MIN_TILE * network.align
        cap = max(self.tile_px if encoding else self.tile_px // self.factor, 2 * halo)
        largest = min(-(-cap // step) * step, -(-max(height, width) // step) * step)

        def need(core: int) -> float:
            crop = core + 2 * halo
            return HEADROOM * per_px * crop**2 + sum(op.device_bytes((height, width), crop) for op in network.ops)

        fitting = [core for core in range(step, largest + 1, step) if need(core) <= budget_bytes]
        useful = min(largest, -(-USEFUL_TILE * network.align // step) * step)
        if not fitting or fitting[-1] < useful:
            gb = need(useful) / GB
            raise GigadiffError(
                f"{{vae_memory}} {budget_bytes / GB:.2g} GB is too small for this VAE: a useful tile "
                f"({useful // network.align} latent px + {halo // network.align} px halo) needs {gb:.2g} GB; give at "
                f"least {round_up(gb)}",
                "vae_memory",
            )
        return Plan(ENGINE, "exact" if self.max_keys is None else "fast", budget_bytes, fitting[-1], need(fitting[-1]))

    def _run(self, network: Network, x: torch.Tensor, sink: TileSink, what: str) -> None:
        plan = self.plan(x.shape[0], x.shape[-2], x.shape[-1], encoding=network is self.encoder)
        self.last_plan = plan
        halo = network.halo(self.device, self.dtype)
        tiled = TiledPass(network.run, network.ops, plan.tile, halo, network.align, network.scale, self.tiling.wrap,
                          network.stage_halos(self.device, self.dtype), KEEP_RAM * available_ram())  # fmt: skip
        cores = len(tiled.cores(x.shape[-2], x.shape[-1]))
        passes = len(network.ops) + 1
        self.listener.on_phase(f"{what} (VAE {plan.mode}, {passes} passes)", cores * passes)
        with network.hooks():
            tiled.run(x, sink, self.device, self.dtype, self._advance)

    def _advance(self) -> None:
        self.listener.on_advance(1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, sink: TileSink | None = None) -> torch.Tensor | None:
        """Diffusion-space latents [B, C, h, w] -> image [B, 3, h*f, w*f] in [-1, 1]; streamed to `sink` if given."""
        z = unscale_latents(self.vae, latents.float().cpu())
        collect = Collector()
        self._run(self.decoder, z, clamped(collect if sink is None else sink), "decoding")
        return collect.image if sink is None else None

    @torch.no_grad()
    def encode(self, image: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        h, w = image.shape[2:]
        if h % self.factor or w % self.factor:
            raise GigadiffError(f"tiled VAE encode: image size {w}x{h} must be a multiple of {self.factor}")
        collect = Collector()
        self._run(self.encoder, image.float().cpu(), collect, "encoding")
        out = collect.image
        latents = posterior_latents(out, sample, generator) if self.encoder.posterior else out
        return scale_latents(self.vae, latents)


def architecture(vae: Any, direction: str) -> str:
    """A VAE's class, config and a direction: what a network's reach depends on."""
    return f"{type(vae).__name__}:{sorted(dict(vae.config).items())!r}:{direction}"


def whole_decode(network: Network, vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """The untiled reference: the decoder over the whole latent at once, attention over every position."""
    with torch.no_grad():
        return network.run(unscale_latents(vae, latents.float())).clamp(-1, 1)
