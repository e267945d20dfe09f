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
from typing import Any, Literal

import torch
import torch.nn.functional as F

from gigadiff import interrupts
from gigadiff.errors import GigadiffError
from gigadiff.vae import budget
from gigadiff.vae.blend import OverlapBlender, even_cuts, tile_span
from gigadiff.vae.engine import Frozen, HostStore, LayerEngine, TileSink
from gigadiff.vae.program import Program, decoder_program, encoder_program
from gigadiff.vae.tiling import VaeTiling

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


@dataclass(frozen=True)
class DecodePlan:
    """What a decode will do, decided (and checked) before any generation starts."""

    mode: Literal["exact", "fast"]
    budget_bytes: float
    tile: int
    """exact: smallest per-layer tile side; fast: tile core side in the program's input pixels."""
    host: budget.HostPlan | None
    layer_tiles: tuple[int, ...] = ()
    """exact: the output tile side of every step."""


def latent_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def fast_keys(program: Program, height: int, width: int) -> int:
    """Keys/values fast mode's attention attends to for an input of this size: all of them, up to MAX_KEYS."""
    return min(MAX_KEYS, (height // program.input_unit) * (width // program.input_unit))


def plan_decode(vae: Any, tiling: VaeTiling, batch: int, height: int, width: int) -> DecodePlan:
    """Choose mode and tile sizes for decoding a [batch, C, height, width] latent; raise if it cannot fit."""
    program = decoder_program(vae)
    return _plan(program, vae, tiling, batch, height, width)


def _plan(program: Program, vae: Any, tiling: VaeTiling, batch: int, height: int, width: int) -> DecodePlan:
    device = next(vae.parameters()).device
    budget_bytes = (tiling.memory_gb or budget.default_memory_gb(device)) * budget.GB
    mode = AUTO if tiling.mode == "auto" else tiling.mode
    if mode == "exact":
        host = budget.plan_host(budget.host_peak_bytes(program, batch, height, width), tiling.spill_dir)
        sides = tuple(budget.layer_tiles(program, budget_bytes))
        return DecodePlan("exact", budget_bytes, min(sides), host, sides)
    unit = program.input_unit
    kv_tokens = fast_keys(program, height, width)
    largest = max(height, width) if device.type != "cpu" else min(max(height, width), CPU_TILE * unit)
    tile = budget.fast_tile(program, batch, budget_bytes, tiling.halo * unit, kv_tokens, largest, unit)
    return DecodePlan("fast", budget_bytes, tile, None)


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
    """Tiled decode/encode for an AutoencoderKL-family VAE (SD 1.x/2.x, SDXL, SD3/FLUX 16-channel)."""

    def __init__(self, vae: Any, tiling: VaeTiling | None = None, listener: Any = None) -> None:
        self.vae = vae
        self.tiling = tiling or VaeTiling()
        self.factor = latent_factor(vae)
        self.last_plan: DecodePlan | None = None
        self.listener = listener
        """Hears the pass as a phase (gigadiff.sampler.Listener's on_phase / on_advance): exact mode's
        steps, or fast mode's statistics pass and tiles."""

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, sink: TileSink | None = None) -> torch.Tensor | None:
        """Diffusion-space latents [B, C, h, w] -> image [B, 3, h*f, w*f] in [-1, 1] (clamped, float32, CPU).

        With a `sink`, image tiles are streamed to it (row-major) and nothing is returned: the image never
        exists whole in memory.
        """
        z = unscale_latents(self.vae, latents.float().cpu())
        collect = Collector() if sink is None else None
        self._run(decoder_program(self.vae), z, _clamped(sink or collect), "decoding")  # type: ignore[arg-type]
        return collect.image if collect is not None else None

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
        plan = _plan(program, self.vae, self.tiling, x.shape[0], x.shape[2], x.shape[3])
        self.last_plan = plan
        if self.listener is not None:
            self.listener.on_phase(f"{what} (VAE {plan.mode})", self._units(program, plan, x.shape[2], x.shape[3]))
        with self._compute_dtype() as dtype:
            if plan.mode == "exact":
                self._exact(program, x, dtype, plan, sink)
            else:
                self._fast(program, x, dtype, plan, sink)

    def _exact(self, program: Program, x: torch.Tensor, dtype: torch.dtype, plan: DecodePlan, sink: TileSink) -> None:
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

    def _fast(self, program: Program, x: torch.Tensor, dtype: torch.dtype, plan: DecodePlan, sink: TileSink) -> None:
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
                box = [round(v * scale) for v in (y0, y1, x0, x1)]
                crops = {n: _crop(t, *box, halo, self.tiling.wrap) for n, t in prefix.buffers.items()}
                top, left = next(iter(crops.values()))[1]
                state = engine.begin({n: crop.to(device) for n, (crop, _) in crops.items()})
                engine.advance(state, prefix.stop, len(program.steps))
                y = state.buffers[program.output]
                span = tile_span(*(round(v * f_out) for v in (y0, y1, x0, x1, h, w)), margin)
                (r0, r1), (c0, c1) = span.rows, span.cols
                oy, ox = round(top / scale * f_out) - span.top, round(left / scale * f_out) - span.left
                blender.add(span, y[:, :, oy : oy + r1 - r0, ox : ox + c1 - c0])
                self._advance()

    def _advance(self) -> None:
        if self.listener is not None:
            self.listener.on_advance(1)

    @staticmethod
    def _units(program: Program, plan: DecodePlan, height: int, width: int) -> int:
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
        whole picture at a lower resolution, whose statistics estimate the full-resolution ones (downsample=1
        and a budget that holds it: exact statistics). When the whole program fits the budget the prefix is
        all of it, and its buffers hold the output.
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
        factor = budget.statistics_downsample(program, stop, live, budget_bytes, kv_tokens, self.tiling.downsample)
        small = {n: F.avg_pool2d(t.float(), factor, ceil_mode=True) if factor > 1 else t for n, t in live.items()}
        rest = LayerEngine(program, device, dtype, self.tiling.wrap, record=True, on_device=True, max_keys=MAX_KEYS)
        rest.advance(rest.begin(small, {n: m for n, m in state.moments.items() if n in live}), stop, steps)
        assert rest.recorded is not None
        stats, kv = {**engine.recorded.stats, **rest.recorded.stats}, {**engine.recorded.kv, **rest.recorded.kv}
        return Frozen(stats, kv), Prefix(stop, {n: t.cpu() for n, t in live.items()}, h, w)

    @contextlib.contextmanager
    def _compute_dtype(self) -> Iterator[torch.dtype]:
        """The VAE's dtype, except fp16 VAEs marked force_upcast (SDXL's) which run in float32 meanwhile."""
        dtype = next(self.vae.parameters()).dtype
        upcast = dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))
        if upcast:
            self.vae.to(torch.float32)
        try:
            yield torch.float32 if upcast else dtype
        finally:
            if upcast:
                self.vae.to(torch.float16)


def _crop(x: torch.Tensor, y0: int, y1: int, x0: int, x1: int, halo: int, wrap: tuple[bool, bool]):
    """x[..., y0-halo:y1+halo, x0-halo:x1+halo]: clipped at the image edge, or taken around it in wrap mode.

    Returns the crop and the offset (top, left) of [y0, x0] inside it.
    """
    h, w = x.shape[2:]

    def axis(a: int, b: int, size: int, wraps: bool) -> tuple[torch.Tensor, int]:
        if wraps:
            return torch.arange(a - halo, b + halo).remainder(size), halo
        lo, hi = max(0, a - halo), min(size, b + halo)
        return torch.arange(lo, hi), a - lo

    rows, top = axis(y0, y1, h, wrap[0])
    cols, left = axis(x0, x1, w, wrap[1])
    return x.index_select(2, rows).index_select(3, cols), (top, left)


class Collector:
    """A sink that assembles streamed tiles into one tensor (for images that fit in memory)."""

    def __init__(self) -> None:
        self.parts: list[tuple[int, int, torch.Tensor]] = []

    def __call__(self, y0: int, x0: int, tile: torch.Tensor) -> None:
        self.parts.append((y0, x0, tile.float().cpu()))

    @property
    def image(self) -> torch.Tensor:
        h = max(y0 + t.shape[2] for y0, _, t in self.parts)
        w = max(x0 + t.shape[3] for _, x0, t in self.parts)
        b, c = self.parts[0][2].shape[:2]
        out = torch.empty(b, c, h, w)
        for y0, x0, t in self.parts:
            out[:, :, y0 : y0 + t.shape[2], x0 : x0 + t.shape[3]] = t
        return out


def _clamped(sink: TileSink) -> TileSink:
    def clamp(y0: int, x0: int, tile: torch.Tensor) -> None:
        sink(y0, x0, tile.float().clamp(-1, 1).cpu())

    return clamp


def posterior_latents(moments: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    """An encoder's moments [B, 2C, h, w] (mean, logvar) -> the mean, or a sample drawn for the whole latent at
    once with `generator` (so tiling does not change it)."""
    mean, logvar = moments.chunk(2, dim=1)
    if not sample:
        return mean
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


def unscale_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Undo the diffusion-space normalisation (scaling factor, shift, per-channel mean/std) of a VAE latent."""
    mean, std, shift = _latent_norm(vae, latents)
    return latents * std / _scaling(vae) + mean + shift


def scale_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `unscale_latents`: VAE latents -> the space the denoiser works in."""
    mean, std, shift = _latent_norm(vae, latents)
    return (latents - mean - shift) * _scaling(vae) / std


def _scaling(vae: Any) -> float:
    """The VAE's scaling factor; 1 for VAEs whose family normalises latents otherwise (FLUX.2: BatchNorm)."""
    return float(getattr(vae.config, "scaling_factor", None) or 1.0)


def _latent_norm(vae: Any, latents: torch.Tensor) -> tuple[Any, Any, float]:
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean_t = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(shape)
        std_t = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(shape)
        return mean_t, std_t, 0.0
    return 0.0, 1.0, float(getattr(cfg, "shift_factor", None) or 0.0)
