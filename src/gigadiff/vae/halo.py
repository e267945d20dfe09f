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
from gigadiff.vae.engine import TileSink
from gigadiff.vae.passes import GlobalOp, TiledPass, execution_order, reach, stage_reach
from gigadiff.vae.tiled import MAX_KEYS, Collector, _clamped, posterior_latents, scale_latents, unscale_latents
from gigadiff.vae.tiling import VaeTiling

TILE_PX = {"cpu": 512, "cuda": 1024}
"""Tile cores in image px by device type (at least twice the halo): on the CPU a tile's buffers should stay
cache-sized, a GPU wants the larger call (the halo's share of the work falls as the core grows)."""


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
    resolution stages): the finer stages then run on little more than the core (gigadiff.vae.passes.TiledPass)."""
    _reach: tuple[int, list[tuple[Any, int]]] | None = None

    def halo(self, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> int:
        """The network's reach in input px (measured once per `architecture`, with its summaries held fixed:
        whether a change arrives does not depend on the weights' values)."""
        return self._measure(device, dtype)[0]

    def stage_halos(self, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> list[tuple[Any, int]]:
        """(stage, reach from its output on) for every stage."""
        return self._measure(device, dtype)[1]

    def _measure(self, device: Any, dtype: torch.dtype) -> tuple[int, list[tuple[Any, int]]]:
        if self._reach is None:
            key = (self.architecture, self.channels, self.scale)
            with self.hooks():
                self.ops = execution_order(self.run, self.ops, self.channels, self.align, device, dtype)
                if key not in _REACH or not self.architecture:
                    whole = reach(self.run, self.ops, self.channels, self.scale, self.align,
                                  start=max(32, 16 * self.align), device=device, dtype=dtype)  # fmt: skip
                    size = -(-(whole + 2 * self.align) // self.align) * self.align
                    stages = [stage_reach(self.run, self.ops, self.channels, self.scale, self.align, stage, size,
                                          device, dtype) for stage in self.stages]  # fmt: skip
                    _REACH[key] = (whole, stages)
            whole, per_stage = _REACH[key]
            self._reach = (whole, list(zip(self.stages, per_stage, strict=True)))
        return self._reach


_REACH: dict[tuple[Any, ...], tuple[int, list[int]]] = {}


class HaloTiledVAE:
    """Decode/encode of a VAE given as two `Network`s (the TiledVAE interface: decode with an optional sink,
    encode with an optional posterior sample)."""

    def __init__(self, vae: Any, decoder: Network, encoder: Network, tiling: VaeTiling | None = None,
                 listener: Any = None, max_keys: int | None = None, tile_px: int | None = None):  # fmt: skip
        self.vae, self.decoder, self.encoder = vae, decoder, encoder
        self.tiling = tiling or VaeTiling()
        self.listener = listener
        self.max_keys = None if self.tiling.mode == "exact" else (max_keys or MAX_KEYS)
        self.device = next(vae.parameters()).device
        self.dtype = next(vae.parameters()).dtype
        self.factor = round(decoder.scale)
        self.tile_px = tile_px or TILE_PX.get(self.device.type, TILE_PX["cuda"])
        """Tile cores in image px (rounded to whole latent px, and raised to twice the halo)."""

    def _pass(self, network: Network, tile: int) -> TiledPass:
        network.fast_keys(self.max_keys)
        halo = network.halo(self.device, self.dtype)
        return TiledPass(network.run, network.ops, max(tile, 2 * halo), halo, network.align, network.scale,
                         self.tiling.wrap, network.stage_halos(self.device, self.dtype))  # fmt: skip

    def _run(self, network: Network, x: torch.Tensor, tile: int, sink: TileSink, what: str) -> None:
        tiled = self._pass(network, tile)
        cores = len(tiled.cores(x.shape[-2], x.shape[-1]))
        if self.listener is not None:
            mode, passes = "exact" if self.max_keys is None else "fast", len(network.ops) + 1
            self.listener.on_phase(f"{what} (VAE {mode}, {passes} passes)", cores * passes)
        with network.hooks():
            tiled.run(x, sink, self.device, self.dtype, self._advance)

    def _advance(self) -> None:
        if self.listener is not None:
            self.listener.on_advance(1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, sink: TileSink | None = None) -> torch.Tensor | None:
        """Diffusion-space latents [B, C, h, w] -> image [B, 3, h*f, w*f] in [-1, 1]; streamed to `sink` if given."""
        z = unscale_latents(self.vae, latents.float().cpu())
        collect = Collector() if sink is None else None
        self._run(self.decoder, z, max(1, self.tile_px // self.factor), _clamped(sink or collect), "decoding")  # type: ignore[arg-type]
        return collect.image if collect is not None else None

    @torch.no_grad()
    def encode(self, image: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        h, w = image.shape[2:]
        if h % self.factor or w % self.factor:
            raise GigadiffError(f"tiled VAE encode: image size {w}x{h} must be a multiple of {self.factor}")
        collect = Collector()
        self._run(self.encoder, image.float().cpu(), self.tile_px, collect, "encoding")
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
