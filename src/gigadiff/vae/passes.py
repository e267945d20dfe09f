"""Tiled passes through a VAE whose only whole-image operations are attention layers.

Qwen-Image's VAE (causal convolutions, per-pixel RMS norms) and SANA's deep-compression autoencoder (convolutions,
per-pixel RMS norms, ReLU linear attention) have no normalisation statistics over the image: apart from their
attention layers, every output pixel depends only on the input within a bounded reach. So a tile taken with a
halo of at least that reach gives exactly the whole pass's output over the tile's core — the reach is measured
on the network itself (`reach`), not declared.

The attention layers are the exception: each position attends over the whole image. Each one is a `GlobalOp`
(installed by the family's backend) whose whole-image part is a small summary gathered tile by tile:

- ReLU linear attention (DC-AE): the sum over positions of v kᵀ per head, d x d numbers. Exact.
- softmax attention (Qwen-Image's mid-block): the keys and values of every position (exact mode), or pooled to
  at most `tiled.MAX_KEYS` (fast mode), as the AutoencoderKL path pools its mid-block's keys.

The driver runs one gathering pass per attention layer, in network order (layer l's input needs the summaries
of the layers before it): every tile runs the network up to layer l, adds its core's part to the summary and
stops there (`Stop`). A last pass runs every tile through the whole network with all summaries frozen and
streams the cores to the sink. Device memory is one tile plus the summaries.

A tile's output of a stage (a module on the network's path, `Stage`) is final once every attention before it has
its summary: from then on the tile's later passes resume from it instead of running the network up to it again
(`TiledPass.keep_bytes` of host memory hold these outputs; past that, passes run from the input). Without that,
each gathering pass would run the network from the input up to its layer: nine passes through the DC-AE
decoder's coarse stages, or as many through an encoder's fine ones.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from gigadiff import interrupts
from gigadiff.overrides import instance_override
from gigadiff.vae.blend import even_cuts
from gigadiff.vae.tiles import TileSink, crop_with_halo

Mode = Literal["plain", "collect", "apply", "probe"]


class Stop(Exception):
    """Raised by the layer being gathered once it has its tile's part: the rest of the network is not needed."""


@dataclass
class Window:
    """Where the running crop sits, in the pass's input pixels (whole-input coordinates, not wrapped): the extent
    the network's current tensor covers (narrowed at stage crops as the network runs), the core, the whole."""

    extent: list[int]
    """[top, left, bottom, right] of what the current tensor holds."""
    core: tuple[int, int, int, int]
    """(top, left, height, width) of the core."""
    whole: tuple[int, int]

    def scale_of(self, x: torch.Tensor) -> float:
        """x's pixels per input pixel."""
        return x.shape[-1] / (self.extent[3] - self.extent[1])

    def at(self, x: torch.Tensor) -> tuple[slice, slice, tuple[int, int], tuple[int, int]]:
        """The core's rows and columns in a layer's input x (at the layer's own resolution), its origin and the
        whole input's size at that resolution."""
        s = self.scale_of(x)
        cy, cx, h, w = self.core
        top, left = round((cy - self.extent[0]) * s), round((cx - self.extent[1]) * s)
        rows, cols = slice(top, top + round(h * s)), slice(left, left + round(w * s))
        return rows, cols, (round(cy * s), round(cx * s)), (round(self.whole[0] * s), round(self.whole[1] * s))

    def narrow(self, x: torch.Tensor, reach: int) -> torch.Tensor:
        """x cut to the core plus `reach` input px on each side (within what it holds): what the rest of the
        network needs from here. The extent follows."""
        s = self.scale_of(x)
        cy, cx, h, w = self.core
        e = self.extent
        new = [max(e[0], cy - reach), max(e[1], cx - reach), min(e[2], cy + h + reach), min(e[3], cx + w + reach)]
        rows = slice(round((new[0] - e[0]) * s), round((new[2] - e[0]) * s))
        cols = slice(round((new[1] - e[1]) * s), round((new[3] - e[1]) * s))
        self.extent = new
        return x[..., rows, cols]


class GlobalOp:
    """A whole-image layer of a tiled network. The backend hooks the layer so that its forward calls
    `self(x, plain)`; the driver sets `mode` and `window`."""

    mode: Mode = "plain"
    window: Window | None = None

    def __call__(self, x: torch.Tensor, plain: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.mode == "plain":
            return plain(x)
        if self.mode == "collect":
            assert self.window is not None
            self.collect(x, self.window)
            raise Stop
        if self.mode == "probe":  # the summary of this very input (`reach` then holds it fixed)
            _TRACE.append(self)
            with torch.no_grad():
                size = (int(x.shape[-2]), int(x.shape[-1]))
                self.reset(None)
                self.collect(x.detach(), Window([0, 0, *size], (0, 0, *size), size))
                self.freeze()
        return self.apply(x)

    def alignment(self, whole: tuple[int, int]) -> int:
        """Input pixels that tile cores must be multiples of (pooling cells); `whole` is the input's size."""
        return 1

    def reset(self, whole: tuple[int, int] | None = None) -> None:
        """Start a new summary (`whole`: the input's size, when the pass knows it)."""
        raise NotImplementedError

    def collect(self, x: torch.Tensor, window: Window) -> None:
        raise NotImplementedError

    def freeze(self) -> None:
        """The summary is complete: make it ready for `apply`."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def device_bytes(self, whole: tuple[int, int], crop: int) -> float:
        """Device bytes this layer holds beyond the network's own activations while it applies its summary to a
        crop of side `crop` (input px) of an input of size `whole` (known once a probe pass has run it)."""
        return 0.0


@contextlib.contextmanager
def modes(ops: Sequence[GlobalOp], mode: Mode, gather: GlobalOp | None = None) -> Iterator[None]:
    """While inside, every op is in `mode`, except `gather` (collecting) and the ops after it (never reached)."""
    try:
        for op in ops:
            op.mode = mode
        if gather is not None:
            gather.mode = "collect"
        yield
    finally:
        for op in ops:
            op.mode, op.window = "plain", None


_TRACE: list[Any] = []
"""The ops (and stage modules) in the order a probe pass ran them."""


@dataclass(frozen=True)
class Stage:
    """A module on a network's path after which a tile's tensor is cut to what the rest of the network needs
    (`reach`: input px around the core) and may be kept for the tile's later passes."""

    module: Any
    reach: int | None
    """None: the output is not cut (a point to resume from only)."""
    ops_before: int = 0
    """How many of the network's ops have run when the module's output is ready: in gathering pass p (ops
    0..p-1 frozen), the output is final if `ops_before` <= p."""


def execution_order(network: Callable[[torch.Tensor], torch.Tensor], ops: Sequence[GlobalOp], channels: int,
                    align: int, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                    stages: Sequence[Any] = ()) -> tuple[list[GlobalOp], list[tuple[int, int]]]:  # fmt: skip
    """`ops` in the order the network runs them (not always the order its modules are registered in: a decoder
    may run its blocks in reverse), and for the `stages` (modules) in the order they finish: (index in `stages`,
    ops run before it finishes). Every op and stage must be on the network's path."""
    _TRACE.clear()
    side = 4 * align
    hooks = [module.register_forward_hook(lambda m, a, o: _TRACE.append(m)) for module in stages]
    try:
        with modes(ops, "probe"), torch.no_grad():
            network(torch.zeros(1, channels, side, side, device=device, dtype=dtype))
    finally:
        for hook in hooks:
            hook.remove()
    trace = list(dict.fromkeys(_TRACE))
    _TRACE.clear()
    op_ids, stage_ids = {id(op) for op in ops}, {id(m): i for i, m in enumerate(stages)}
    order = [item for item in trace if id(item) in op_ids]
    if len(order) != len(ops):
        raise RuntimeError(f"{len(ops) - len(order)} of the network's attention layers did not run in a probe pass")
    finished, seen = [], 0
    for item in trace:
        if id(item) in op_ids:
            seen += 1
        elif id(item) in stage_ids:
            finished.append((stage_ids[id(item)], seen))
    if len(finished) != len(stages):
        raise RuntimeError(f"{len(stages) - len(finished)} of the network's stages did not run in a probe pass")
    return order, finished


def reach(network: Callable[[torch.Tensor], torch.Tensor], ops: Sequence[GlobalOp], channels: int, scale: float,
          align: int, start: int = 32, limit: int = 2048, device: Any = "cpu",
          dtype: torch.dtype = torch.float32) -> int:  # fmt: skip
    """How far, in input pixels, a change of the input reaches in the network's output, with every attention's
    summary held fixed: the output changed by bumping one band of the input (two passes without gradients;
    outside the reach the output is bitwise the same). Convolutions reach as far forward as backward, so tiles
    need this much halo. Each axis is probed on a strip a few blocks wide across it (a straight path along the
    axis is the farthest a change travels), so a probe costs a sliver of an image. `scale`: output px per input
    px. Grows the probe until the change stays inside it."""
    size = start
    while True:
        size = -(-size // align) * align
        radius = max(_strip_reach(network, ops, channels, scale, align, size, axis, device, dtype) for axis in (2, 3))
        if radius < size - align or size >= limit:
            return -(-max(radius, 0) // align) * align
        size *= 2


def stage_reach(network: Callable[[torch.Tensor], torch.Tensor], ops: Sequence[GlobalOp], channels: int,
                scale: float, align: int, stage: Any, size: int, device: Any = "cpu",
                dtype: torch.dtype = torch.float32) -> int:  # fmt: skip
    """Like `reach`, from the output of `stage` (a module on the network's path) onward: how far around the core,
    in input px (a multiple of `align`), the stage's output is still needed. `size` must exceed the network's
    whole reach (a suffix of a network reaches no farther than all of it)."""
    radius = max(_strip_reach(network, ops, channels, scale, align, size, axis, device, dtype, stage)
                 for axis in (2, 3))  # fmt: skip
    return -(-max(radius, 0) // align) * align


def _strip_reach(network: Callable[[torch.Tensor], torch.Tensor], ops: Sequence[GlobalOp], channels: int,
                 scale: float, align: int, size: int, axis: int, device: Any, dtype: torch.dtype,
                 stage: Any = None) -> int:  # fmt: skip
    """The reach along `axis` of a bump of input band [size, size + align) (or of the same band of `stage`'s
    output), on a strip 4 blocks wide."""
    long, across = 2 * size + align, 4 * align
    shape = (1, channels, long, across) if axis == 2 else (1, channels, across, long)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    bumped = x.clone()
    hook = None
    if stage is None:
        bumped.narrow(axis, size, align).add_(1.0)
    else:

        def bump(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
            s = out.shape[axis - 4] / long
            lo, hi = round(size * s), max(round((size + align) * s), round(size * s) + 1)
            out = out.clone()
            out.narrow(out.dim() + axis - 4, lo, hi - lo).add_(1.0)
            return out

    with torch.no_grad(), modes(ops, "probe"):  # each attention summarises this input ...
        base = network(x)
        for op in ops:
            op.mode = "apply"  # ... and keeps that summary for the bumped input
        if stage is not None:
            hook = stage.register_forward_hook(bump)
        try:
            changed = network(bumped)
        finally:
            if hook is not None:
                hook.remove()
    diff = (changed - base).float()
    hit = (diff != 0) | diff.isnan()
    along = hit.flatten(0, 1).any(dim=0).any(dim=1 if axis == 2 else 0).nonzero().flatten()
    return _beyond(along, size, align, scale) if len(along) else 0


def _beyond(changed: torch.Tensor, size: int, align: int, scale: float) -> int:
    """Input px by which the changed output px (one axis) extend beyond the bumped input block [size, size+align)."""
    lo, hi = int(changed.min()), int(changed.max())
    return max(size - math.floor(lo / scale), math.ceil((hi + 1) / scale) - (size + align))


@dataclass(frozen=True)
class TiledPass:
    """One tiled pass of a network over an input [B, C, H, W]: cores of at most `tile` input px, `halo` px of
    context (`reach`), cores and halos multiples of `align` input px; `scale` output px per input px."""

    network: Callable[[torch.Tensor], torch.Tensor]
    ops: Sequence[GlobalOp]
    tile: int
    halo: int
    align: int
    scale: float
    wrap: tuple[bool, bool] = (False, False)
    stages: Sequence[Stage] = ()
    """In the order the network runs them: after each, its output is cut to the core plus the stage's reach (the
    halo the rest of the network needs), so the later, finer stages run on little more than the core."""
    keep_bytes: float = 0.0
    """Host bytes for the tiles' final stage outputs, from which their later passes resume."""
    _current: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    """The window of the tile being run, the stage it resumes after and the one whose output it keeps."""

    def cores(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        step = math.lcm(self.align, *(op.alignment((height, width)) for op in self.ops))

        def cuts(size: int) -> list[tuple[int, int]]:
            bounds = even_cuts(size, max(step, self.tile // step * step), step)
            return list(itertools.pairwise(bounds))

        return [(y0, y1, x0, x1) for y0, y1 in cuts(height) for x0, x1 in cuts(width)]

    def run(self, x: torch.Tensor, sink: TileSink, device: Any, dtype: torch.dtype,
            advance: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        """Gathering passes (one per op) and the output pass; the output cores go to `sink` in row-major order."""
        height, width = x.shape[-2:]
        cores = self.cores(height, width)
        with contextlib.ExitStack() as stack:
            for index, stage in enumerate(self.stages):
                hook = stage.module.register_forward_hook(self._after_stage(index))
                stack.callback(hook.remove)
            self._passes(x, cores, sink, device, dtype, advance)

    def _after_stage(self, index: int) -> Callable[..., torch.Tensor]:
        """The forward hook of stage `index`: cut its output to what the rest needs, and keep it if asked."""

        def after(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
            window: Window | None = self._current.get("window")
            if window is None or index <= self._current.get("resumed", -1):
                return out  # not a tiled pass, or replaying a kept output (already cut)
            reach = self.stages[index].reach
            if reach is not None:
                out = window.narrow(out, reach)
            if index == self._current.get("keep"):
                self._current["kept"] = Kept(index, out.detach().to("cpu", copy=True), tuple(window.extent))
            return out

        return after

    def _passes(self, x: torch.Tensor, cores: list[tuple[int, int, int, int]], sink: TileSink, device: Any,
                dtype: torch.dtype, advance: Callable[[], None]) -> None:  # fmt: skip
        height, width = x.shape[-2:]
        kept: dict[int, Kept] = {}
        for i, op in enumerate(self.ops):
            op.reset((height, width))
            final = [j for j, stage in enumerate(self.stages) if stage.ops_before <= i]
            with modes(self.ops[:i], "apply", gather=op):
                for t, core in enumerate(cores):
                    self._tile(x, core, device, dtype, True, kept, t, final[-1] if final else None)
                    advance()
            op.freeze()
        with modes(self.ops, "apply"):
            for t, core in enumerate(cores):
                out = self._tile(x, core, device, dtype, False, kept, t, None)
                kept.pop(t, None)
                assert out is not None
                y0, _, x0, _ = core
                sink(round(y0 * self.scale), round(x0 * self.scale), out)
                advance()

    def _tile(self, x: torch.Tensor, core: tuple[int, int, int, int], device: Any, dtype: torch.dtype,
              expect_stop: bool, kept: dict[int, Kept], t: int, keep: int | None) -> torch.Tensor | None:  # fmt: skip
        """Run tile `t` from its input, or from the stage output kept for it; keep stage `keep`'s output if it
        is deeper than what is kept and fits `keep_bytes`."""
        interrupts.check()
        y0, y1, x0, x1 = core
        crop, (top, left) = crop_with_halo(x, y0, y1, x0, x1, self.halo, self.wrap)
        extent = [y0 - top, x0 - left, y0 - top + crop.shape[-2], x0 - left + crop.shape[-1]]
        window = Window(extent, (y0, x0, y1 - y0, x1 - x0), (int(x.shape[-2]), int(x.shape[-1])))
        for op in self.ops:
            op.window = window
        resume = kept.get(t)
        held = sum(k.tensor.nbytes for k in kept.values()) - (resume.tensor.nbytes if resume else 0)
        if (resume is not None and keep is not None and resume.stage >= keep) or held >= self.keep_bytes:
            keep = None  # what is kept is as deep as this pass could keep, or nothing more fits
        self._current.update(window=window, resumed=-1 if resume is None else resume.stage, keep=keep, kept=None)
        try:
            with contextlib.ExitStack() as stack:
                if resume is not None:
                    self._resume(stack, resume, window, device, dtype)
                out = self.network(crop.to(device, dtype))
        except Stop:
            return None
        finally:
            new = self._current.get("kept")
            if new is not None and held + new.tensor.nbytes <= self.keep_bytes:
                kept[t] = new
            self._current.clear()
        assert not expect_stop, "a gathering pass ran to the end: its op is not on the network's path"
        rows, cols, _, _ = window.at(out)
        return out[..., rows, cols]

    def _resume(self, stack: contextlib.ExitStack, resume: Kept, window: Window, device: Any,
                dtype: torch.dtype) -> None:  # fmt: skip
        """While `stack` is open, the stages up to the kept one do not run: the earlier ones pass their input
        through (it is thrown away) and the kept one gives its kept output, the window narrowed as it was."""

        def skipped(*args: Any, **kwargs: Any) -> Any:
            return args[0]

        def replay(*args: Any, **kwargs: Any) -> torch.Tensor:
            window.extent = list(resume.extent)
            return resume.tensor.to(device, dtype)

        for j in range(resume.stage + 1):
            stack.enter_context(instance_override(self.stages[j].module, "forward",
                                                  replay if j == resume.stage else skipped))  # fmt: skip


@dataclass(frozen=True)
class Kept:
    """A tile's output of a stage, final for every later pass, with the extent it covers."""

    stage: int
    tensor: torch.Tensor
    extent: tuple[int, ...]


class SoftmaxAttention(GlobalOp):
    """Softmax self-attention over the whole image; the summary is every position's key and value (`max_keys`
    None) or keys/values averaged over f x f cells of the whole image, at most `max_keys` of them, each logit
    raised by log(members) (gigadiff.vae.attention.pooled). The family subclass says how its layer computes
    queries, keys and values [B, heads, N, d] (row-major positions) and finishes from the attended values.
    `scale`: the layer's pixels per pass input pixel."""

    def __init__(self, scale: float, max_keys: int | None, chunk: int = 4096):
        self.scale, self.max_keys, self.chunk = scale, max_keys, chunk
        self.cell = 1
        self.layer_hw = (0, 0)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.frozen: Any = None
        self.heads = self.width = 0
        """Heads and their total width (heads x head dim), seen when the layer first collected."""

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _layer_size(self, whole: tuple[int, int]) -> tuple[int, int]:
        return round(whole[0] * self.scale), round(whole[1] * self.scale)

    def _cell(self, whole: tuple[int, int]) -> int:
        h, w = self._layer_size(whole)
        f = 1
        while self.max_keys is not None and math.ceil(h / f) * math.ceil(w / f) > self.max_keys:
            f += 1
        return f

    def alignment(self, whole: tuple[int, int]) -> int:
        return max(1, round(self._cell(whole) / self.scale))

    def reset(self, whole: tuple[int, int] | None = None) -> None:
        self.cell = self._cell(whole) if whole is not None else 1
        self.keys = self.values = self.frozen = None

    def collect(self, x: torch.Tensor, window: Window) -> None:
        _, k, v = self.qkv(x)
        rows, cols, origin, whole = window.at(x)
        f, self.layer_hw = self.cell, whole
        grid = (math.ceil(whole[0] / f), math.ceil(whole[1] / f))
        if self.keys is None:
            b, heads, _, d = k.shape
            self.heads, self.width = heads, heads * d
            self.keys = torch.zeros(b, heads, d, *grid)
            self.values = torch.zeros(b, heads, d, *grid)
        assert self.values is not None
        for store, t in ((self.keys, k), (self.values, v)):
            b, heads, _, d = t.shape
            planes = t.transpose(2, 3).reshape(b * heads, d, x.shape[-2], x.shape[-1])[:, :, rows, cols].float()
            if f > 1:
                planes = torch.nn.functional.avg_pool2d(planes, f, ceil_mode=True, count_include_pad=False)
            top, left = origin[0] // f, origin[1] // f
            store[:, :, :, top : top + planes.shape[-2], left : left + planes.shape[-1]] = planes.view(
                b, heads, d, *planes.shape[-2:]
            ).cpu()

    def freeze(self) -> None:
        from gigadiff.vae.attention import KeyValues

        assert self.keys is not None and self.values is not None
        b, heads, d, gh, gw = self.keys.shape
        log_weight = None
        if self.cell > 1:  # a cell's weight is its member count (cells cut by the image's edge have fewer)
            ones = torch.ones(1, 1, *self.layer_hw)
            members = torch.nn.functional.avg_pool2d(ones, self.cell, ceil_mode=True, divisor_override=1)
            log_weight = members.flatten().log()

        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, heads, d, gh * gw).transpose(2, 3).contiguous()

        self.frozen = KeyValues(flat(self.keys), flat(self.values), log_weight)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        from gigadiff.vae.attention import attend

        q, _, _ = self.qkv(x)
        kv = self.frozen
        kv = type(kv)(kv.keys.to(q.device, q.dtype), kv.values.to(q.device, q.dtype),
                      None if kv.log_weight is None else kv.log_weight.to(q.device, q.dtype))  # fmt: skip
        return self.finish(x, attend(q, kv, q.shape[-1] ** -0.5, self.chunk))

    def device_bytes(self, whole: tuple[int, int], crop: int) -> float:
        """Every key and value moved to the device (float32), and one block of logits: the crop's queries
        against `chunk` keys at a time (gigadiff.vae.attention.attend), with their exponentials."""
        h, w = self._layer_size(whole)
        f = self._cell(whole)
        keys = math.ceil(h / f) * math.ceil(w / f)
        queries = round(crop * self.scale) ** 2
        return 4.0 * (2 * keys * self.width + 2 * self.heads * queries * min(self.chunk, keys))


class LinearAttention(GlobalOp):
    """ReLU linear attention over the whole image (EfficientViT, SANA's DC-AE): out_n = (S q_n)[:d] / (S q_n)[d]
    with S = sum over positions of [v; 1] kᵀ per head. S is summed tile by tile: exact. The family subclass gives
    the layer's (q, k, v) [B, heads, d, N] (after the kernel's ReLU) and finishes from the attended values."""

    def __init__(self, eps: float = 1e-15):
        self.eps = eps
        self.sums: torch.Tensor | None = None

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset(self, whole: tuple[int, int] | None = None) -> None:
        self.sums = None

    def collect(self, x: torch.Tensor, window: Window) -> None:
        _, k, v = self.qkv(x)
        rows, cols, _, _ = window.at(x)
        h, w = x.shape[-2:]

        def core(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (h, w))[..., rows, cols].flatten(-2).float()

        v_pad = torch.nn.functional.pad(core(v), (0, 0, 0, 1), value=1.0)
        part = (v_pad @ core(k).transpose(-1, -2)).cpu()
        self.sums = part if self.sums is None else self.sums + part

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        q, _, _ = self.qkv(x)
        assert self.sums is not None
        out = self.sums.to(q.device) @ q.float()
        return self.finish(x, out[:, :, :-1] / (out[:, :, -1:] + self.eps))
