"""gigadiff's tiled VAE: decode and encode of any size with one set of normalisation statistics.

Two modes, both with every tile normalised by the SAME GroupNorm statistics (no tone shifts between tiles):

- exact: the network runs layer by layer over the whole image (engine.py); GroupNorm uses the whole image's
  statistics and the mid-block attention attends over every position. Equal to the whole-image decode up to
  float rounding. Whole-image buffers live in host RAM (or memory-mapped files); the device holds one tile.
- fast: the leading steps that fit the memory budget (a decoder's latent-resolution layers and its attention;
  for a small image, all of them) run over the whole input, so their statistics are exact and the attention
  sees every position. The later steps' statistics are estimated from one pass over the image downsampled
  from there on (the whole picture at a lower resolution); then each tile, with a `halo` of context, goes
  through those later steps alone with the frozen numbers, resuming from the whole-image buffers, and is
  streamed out. Attention attends to keys/values pooled to at most MAX_KEYS positions (exact below that).
  Device memory is bounded by the budget, not by the image; the error comes from the estimated statistics and
  the halo cut-off (tests, bench/vae.py).

`auto` is fast (see AUTO). Wrap mode makes the image continue across its edges (left/right, top/bottom or
both) for seamless textures.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gigadiff import interrupts
from gigadiff.errors import GigadiffError
from gigadiff.events import Listener, NullListener
from gigadiff.vae import budget
from gigadiff.vae.blend import OverlapBlender, even_cuts, tile_span
from gigadiff.vae.engine import Frozen, HostStore, LayerEngine, bytes_per_output_px
from gigadiff.vae.latents import posterior_latents, scale_latents, unscale_latents
from gigadiff.vae.plan import Plan
from gigadiff.vae.program import Program, decoder_program, encoder_program
from gigadiff.vae.tiles import Collector, TileSink, clamped, crop_with_halo
from gigadiff.vae.tiling import VaeTiling

ENGINE = "groupnorm"
CPU_TILE = 128
"""Fast mode on the CPU: tile cores of at most this many latent px, even when the budget allows more. Larger
tiles' buffers miss the caches and are faulted in afresh: bench VAE at 4096², 2 GB, tile pass 8.3 s with
128-px tiles against 11.1 s with the budget's 336 (96: 8.3 s, 64: 8.6 s, where the halo's share grows)."""
AUTO = "fast"
"""What `--vae-mode auto` runs. Measured (bench/vae.py): fast decodes an image whole whenever that fits its
memory budget (then only its attention's key pooling differs from an untiled decode: 64-67 dB PSNR) and
otherwise streams tiles with estimated statistics (42.5 dB at 4096², 45.7 dB on SD's full-width VAE: at most
a level or two of 255 anywhere), at 0.7-1.1x the time of diffusers' own tiling; exact equals the untiled decode
(8e-5) but costs 3-5x an untiled decode and 4.5-25x fast mode on the CPU. The difference fast leaves is below
what anyone can see, the time exact costs is not, so auto is fast; exact is there to ask for."""
MAX_KEYS = 4096
"""Fast mode's attention keys/values per image: whole-image attention pooled down to this many positions, the
key count of one 64² tile (what diffusers' tiling attends to per query). Its error alone (exact statistics,
bench VAE, 2048²): 64.2 dB PSNR against the exact attention's decode, 74.4 dB at 16384 keys, 57.2 at 1024;
sampled statistics leave far less (about 30 dB). 4096 instead of 16384 keys makes fast decodes 8-16% faster
there, 5% on SD's full-width VAE at 1024², at no measurable cost in their PSNR against whole."""


def latent_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def fast_keys(program: Program, height: int, width: int) -> int:
    """Keys/values fast mode's attention attends to for an input of this size: all of them, up to MAX_KEYS."""
    return min(MAX_KEYS, (height // program.input_unit) * (width // program.input_unit))


def plan_program(program: Program, vae: Any, tiling: VaeTiling, batch: int, height: int, width: int) -> Plan:
    """Choose mode and tile sizes for running `program` over a [batch, C, height, width] input; raise if it
    cannot fit the budget."""
    device = next(vae.parameters()).device
    budget_bytes = budget.memory_budget(tiling.memory_gb, device)
    mode = AUTO if tiling.mode == "auto" else tiling.mode
    if mode == "exact":
        host = budget.plan_host(budget.host_peak_bytes(program, batch, height, width), tiling.spill_dir)
        sides = tuple(budget.layer_tiles(program, budget_bytes))
        peak = max(bytes_per_output_px(s) * side**2 for s, side in zip(program.steps, sides, strict=True))
        return Plan(ENGINE, "exact", budget_bytes, min(sides), peak, host, sides)
    unit = program.input_unit
    kv_tokens = fast_keys(program, height, width)
    largest = max(height, width) if device.type != "cpu" else min(max(height, width), CPU_TILE * unit)
    tile = budget.fast_tile(program, batch, budget_bytes, tiling.halo * unit, kv_tokens, largest, unit)
    peak = budget.fast_tile_bytes(program, batch, tile + 2 * tiling.halo * unit, kv_tokens)
    return Plan(ENGINE, "fast", budget_bytes, tile, peak)


@dataclass(frozen=True)
class Prefix:
    """Fast mode's leading steps, run over the whole input: the buffers live after them, where tiles resume.

    `stop` steps are done; `buffers` (on the host, all of one spatial size) are what the remaining steps read,
    or the program's output when all steps are done. height x width is the program's input size.
    """

    stop: int
    buffers: dict[str, torch.Tensor]
    height: int
    width: int

    @property
    def scale(self) -> float:
        """Buffer px per input px."""
        return next(iter(self.buffers.values())).shape[2] / self.height


class TiledVAE:
    """The "groupnorm" engine (gigadiff.vae.engines): tiled decode/encode for an AutoencoderKL-family VAE (SD
    1.x/2.x, SDXL, SD3/FLUX 16-channel)."""

    def __init__(self, vae: Any, tiling: VaeTiling | None = None, listener: Listener | None = None) -> None:
        self.vae = vae
        self.tiling = tiling or VaeTiling()
        self.factor = latent_factor(vae)
        self.last_plan: Plan | None = None
        self.statistics_pass = ""
        """How fast mode's last statistics pass ran: "whole" buffers on the device, or "tiled" layer by layer."""
        self.listener = listener or NullListener()
        """Hears the pass as a phase: exact mode's steps, or fast mode's statistics pass and tiles."""

    def plan(self, batch: int, height: int, width: int, encoding: bool = False) -> Plan:
        program = encoder_program(self.vae) if encoding else decoder_program(self.vae)
        return plan_program(program, self.vae, self.tiling, batch, height, width)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, sink: TileSink | None = None) -> torch.Tensor | None:
        """Diffusion-space latents [B, C, h, w] -> image [B, 3, h*f, w*f] in [-1, 1] (clamped, float32, CPU).

        With a `sink`, image tiles are streamed to it (row-major) and nothing is returned: the image never
        exists whole in memory.
        """
        z = unscale_latents(self.vae, latents.float().cpu())
        collect = Collector()
        self._run(decoder_program(self.vae), z, clamped(collect if sink is None else sink), "decoding")
        return collect.image if sink is None else None

    @torch.no_grad()
    def encode(
        self, image: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] (H, W multiples of the VAE factor) -> diffusion-space latents.

        sample=False takes the posterior mean; sample=True draws from it with `generator` (as diffusers'
        img2img pipelines do), the noise drawn for the whole latent at once so tiling does not change it.
        """
        h, w = image.shape[2:]
        if h % self.factor or w % self.factor:
            raise GigadiffError(f"tiled VAE encode: image size {w}x{h} must be a multiple of {self.factor}")
        collect = Collector()
        self._run(encoder_program(self.vae), image.float().cpu(), collect, "encoding")
        return scale_latents(self.vae, posterior_latents(collect.image, sample, generator))

    def _run(self, program: Program, x: torch.Tensor, sink: TileSink, what: str) -> None:
        """Plan (and check) the run of `program` on x, then stream its output to `sink` in the chosen mode."""
        plan = plan_program(program, self.vae, self.tiling, x.shape[0], x.shape[2], x.shape[3])
        self.last_plan = plan
        self.listener.on_phase(f"{what} (VAE {plan.mode})", self._units(program, plan, x.shape[2], x.shape[3]))
        with self._compute_dtype() as dtype:
            if plan.mode == "exact":
                self._exact(program, x, dtype, plan, sink)
            else:
                self._fast(program, x, dtype, plan, sink)

    def _exact(self, program: Program, x: torch.Tensor, dtype: torch.dtype, plan: Plan, sink: TileSink) -> None:
        device = next(self.vae.parameters()).device
        sides = plan.layer_tiles
        store = HostStore(plan.host.ram_bytes, plan.host.spill_dir) if plan.host else HostStore()
        chunk = budget.key_chunk(program, plan.budget_bytes, sides, x.shape[2], x.shape[3])
        engine = LayerEngine(program, device, dtype, self.tiling.wrap, tile_px=lambda i: sides[i], key_chunk=chunk,
                             store=store)  # fmt: skip
        state = engine.begin({program.input: x})
        for i in range(len(program.steps)):
            engine.advance(state, i, i + 1, sink)
            self._advance()

    def _fast(self, program: Program, x: torch.Tensor, dtype: torch.dtype, plan: Plan, sink: TileSink) -> None:
        frozen, prefix = self.statistics(program, x, dtype, plan.budget_bytes)
        self._advance()
        if prefix.stop == len(program.steps):  # the whole program ran over the whole input: that is the output
            sink(0, 0, prefix.buffers[program.output])
        else:
            self.tiles(program, prefix, dtype, frozen, plan.tile, sink)

    def tiles(
        self, program: Program, prefix: Prefix, dtype: torch.dtype, frozen: Frozen, core: int, sink: TileSink
    ) -> None:
        """Fast mode's tile pass: tiles of about `core` (input px), each with its halo, through the rest of the
        network alone, resuming from the prefix's buffers.

        Neighbouring tiles cross-fade over `blend` latent px on each side of their cut (see blend.py).
        """
        device = next(self.vae.parameters()).device
        unit, f_out = program.input_unit, program.output_per_input
        scale = prefix.scale  # prefix buffer px per input px
        halo = round(self.tiling.halo * unit * scale)
        engine = LayerEngine(program, device, dtype, frozen=frozen, on_device=True)
        h, w = prefix.height, prefix.width
        rows, cols = even_cuts(h, core, unit), even_cuts(w, core, unit)
        smallest = min(b - a for cuts in (rows, cols) for a, b in itertools.pairwise(cuts))
        margin = round(min(self.tiling.blend * unit, smallest // 2) * f_out)
        blender = OverlapBlender(sink, round(w * f_out))
        for y0, y1 in itertools.pairwise(rows):
            for x0, x1 in itertools.pairwise(cols):
                interrupts.check()
                by0, by1, bx0, bx1 = (round(v * scale) for v in (y0, y1, x0, x1))
                crops = {n: crop_with_halo(t, by0, by1, bx0, bx1, halo, self.tiling.wrap)
                         for n, t in prefix.buffers.items()}  # fmt: skip
                top, left = next(iter(crops.values()))[1]
                state = engine.begin({n: crop.to(device) for n, (crop, _) in crops.items()})
                engine.advance(state, prefix.stop, len(program.steps))
                y = state.buffers[program.output]
                oy0, oy1, ox0, ox1, oh, ow = (round(v * f_out) for v in (y0, y1, x0, x1, h, w))
                span = tile_span(oy0, oy1, ox0, ox1, oh, ow, margin)
                (r0, r1), (c0, c1) = span.rows, span.cols
                oy, ox = round(top / scale * f_out) - span.top, round(left / scale * f_out) - span.left
                blender.add(span, y[:, :, oy : oy + r1 - r0, ox : ox + c1 - c0])
                self._advance()

    def _advance(self) -> None:
        self.listener.on_advance(1)

    @staticmethod
    def _units(program: Program, plan: Plan, height: int, width: int) -> int:
        """Progress units of a pass: exact mode's steps; fast mode's statistics pass and tiles (at most: a pass
        whose prefix is the whole program has no tiles, and then it ends at one)."""
        if plan.mode == "exact":
            return len(program.steps)
        unit = program.input_unit
        return 1 + (len(even_cuts(height, plan.tile, unit)) - 1) * (len(even_cuts(width, plan.tile, unit)) - 1)

    def statistics(
        self, program: Program, x: torch.Tensor, dtype: torch.dtype, budget_bytes: float
    ) -> tuple[Frozen, Prefix]:
        """Fast mode's statistics pass: every norm's statistics and every attention's (pooled) keys/values.

        The leading steps that fit the budget (a decoder's latent-resolution layers and its attention; see
        budget.exact_prefix) run over the whole input: their statistics are exact, their attention sees the
        whole image, and the tile pass resumes from their buffers (returned as the `Prefix`). The remaining
        steps run once over those buffers average-pooled by `downsample` (more, if the budget needs it): the
        whole picture at a lower resolution, whose statistics estimate the full-resolution ones (downsample=1:
        exact statistics). That pass runs over whole buffers on the device when they fit the budget; else it runs
        layer by layer in tiles over host buffers (exact mode's engine) at full resolution: exact statistics at
        the device memory of one tile, for the time of an exact pass. (Raising the factor until a whole pass
        fit left a tight budget's statistics from the image pooled 3x and more, and a budget whose prefix ends at
        the latent's resolution would pool the latent itself, a different picture: 7.6 to 19 dB from the whole
        decode with colours shifted, where diffusers' own tiling gives 22-33.) When the whole program fits the
        budget the prefix is all of it, and its buffers hold the output.
        """
        device = next(self.vae.parameters()).device
        steps = len(program.steps)
        b, h, w = x.shape[0], x.shape[2], x.shape[3]
        kv_tokens = fast_keys(program, h, w)
        stop = budget.exact_prefix(program, b, h, w, budget_bytes, kv_tokens)
        engine = LayerEngine(program, device, dtype, self.tiling.wrap, record=True, on_device=True, max_keys=MAX_KEYS)
        state = engine.begin({program.input: x.to(device)})
        engine.advance(state, 0, stop)
        assert engine.recorded is not None
        if stop == steps:
            return engine.recorded, Prefix(steps, {program.output: state.buffers[program.output]}, h, w)
        last_use = program.last_use()
        live = {n: t for n, t in state.buffers.items() if last_use.get(n, -1) >= stop}
        factor = self.tiling.downsample
        if budget.statistics_fit(program, stop, live, budget_bytes, kv_tokens, factor):
            self.statistics_pass = "whole"
            small = {n: F.avg_pool2d(t.float(), factor, ceil_mode=True) if factor > 1 else t for n, t in live.items()}
            rest = LayerEngine(program, device, dtype, self.tiling.wrap, record=True, on_device=True,
                               max_keys=MAX_KEYS)  # fmt: skip
        else:  # exact statistics, layer by layer: a short prefix pooled would mean a decode of pooled latents
            self.statistics_pass = "tiled"
            factor = 1
            small = {n: t.cpu() for n, t in live.items()}
            sides = budget.layer_tiles(program, budget_bytes)
            peak = budget.host_peak_bytes(program, b, -(-h // factor), -(-w // factor))
            host = budget.plan_host(peak, self.tiling.spill_dir)
            rest = LayerEngine(program, device, dtype, self.tiling.wrap, tile_px=lambda i: sides[i],
                               key_chunk=budget.key_chunk(program, budget_bytes, tuple(sides), h, w),
                               store=HostStore(host.ram_bytes, host.spill_dir), record=True,
                               max_keys=MAX_KEYS)  # fmt: skip
        rest.advance(rest.begin(small, {n: m for n, m in state.moments.items() if n in live}), stop, steps)
        assert rest.recorded is not None
        stats, kv = {**engine.recorded.stats, **rest.recorded.stats}, {**engine.recorded.kv, **rest.recorded.kv}
        return Frozen(stats, kv), Prefix(stop, {n: t.cpu() for n, t in live.items()}, h, w)

    @contextlib.contextmanager
    def _compute_dtype(self) -> Iterator[torch.dtype]:
        """The VAE's dtype, except fp16 VAEs marked force_upcast (SDXL's) which run in float32 meanwhile."""
        dtype = next(self.vae.parameters()).dtype
        upcast = dtype == torch.float16 and bool(self.vae.config.get("force_upcast", False))
        if upcast:
            self.vae.to(torch.float32)
        try:
            yield torch.float32 if upcast else dtype
        finally:
            if upcast:
                self.vae.to(torch.float16)
