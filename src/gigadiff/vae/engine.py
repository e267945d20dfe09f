"""Run a VAE `Program` step by step over a whole image, one tile of one layer at a time.

Each step reads its input buffer through a window of exactly the rows and columns its convolution needs
(zero outside the image, or the opposite edge in wrap mode), so every tile's output equals the whole-image
layer's output at those positions: stitching introduces no error at all. GroupNorm uses the statistics of the
whole input buffer (accumulated while that buffer was written) and attention uses the keys and values of every
position. Device memory holds one tile of one layer; whole buffers live in host memory, or in memory-mapped
files when a `HostStore` says RAM is short.

The same engine, given `Frozen` statistics and keys/values, runs a single small tile through the whole network
on the device: that is fast mode (see tiled.py).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gigadiff import interrupts
from gigadiff.vae.attention import KeyValues, attend, merge_heads, pooled, project_tokens, split_heads
from gigadiff.vae.program import AttentionStep, ConvStep, Program, Step
from gigadiff.vae.stats import ChannelMoments, GroupStats
from gigadiff.vae.tiles import TileSink


@dataclass
class Frozen:
    """What fast mode borrows from a statistics pass: each norm's statistics, each attention's keys/values."""

    stats: dict[int, GroupStats] = field(default_factory=dict)
    kv: dict[int, KeyValues] = field(default_factory=dict)


@dataclass
class RunState:
    """The live buffers of a run between steps, and the moments of those that later norms will read."""

    buffers: dict[str, torch.Tensor]
    moments: dict[str, ChannelMoments]


@dataclass
class HostStore:
    """Allocates whole-image buffers in RAM up to `ram_bytes`, then as memory-mapped files under `spill_dir`."""

    ram_bytes: float = math.inf
    spill_dir: Path | None = None
    in_ram: int = 0
    peak: int = 0
    _files: dict[int, Path] = field(default_factory=dict)

    def allocate(self, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = 4 * math.prod(shape)
        if self.in_ram + nbytes <= self.ram_bytes or self.spill_dir is None:
            self.in_ram += nbytes
            self.peak = max(self.peak, self.in_ram)
            return torch.empty(shape, dtype=torch.float32)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="gigadiff-vae-", suffix=".f32", dir=self.spill_dir)
        path = Path(name)
        with open(fd, "wb") as f:
            f.truncate(nbytes)
        t = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="r+", shape=shape))
        self._files[id(t)] = path
        return t

    def free(self, t: torch.Tensor) -> None:
        path = self._files.pop(id(t), None)
        if path is None:
            self.in_ram -= 4 * t.numel()
        else:
            path.unlink(missing_ok=True)


def window_index(start: int, stop: int, stride: int, kernel: int, pad_before: int, size: int, up: int, wrap: bool):
    """Input positions (and their validity) that output positions [start, stop) of a convolution read.

    Positions are in the (optionally x`up` nearest-upsampled) input; invalid ones are the zero padding.
    Returns (index into the stored, not upsampled, buffer; validity mask).
    """
    pos = torch.arange(stride * start - pad_before, stride * (stop - 1) - pad_before + kernel)
    extent = size * up
    if wrap:
        pos = pos.remainder(extent)
    valid = (pos >= 0) & (pos < extent)
    return torch.where(valid, pos.clamp(0, extent - 1) // up, 0), valid


def gather(buf: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """buf[:, :, rows][:, :, :, cols], reading a contiguous slice when the indices are one."""
    row_run, col_run = _as_slice(rows), _as_slice(cols)
    out = buf[:, :, row_run] if row_run else buf.index_select(2, rows)
    return out[:, :, :, col_run] if col_run else out.index_select(3, cols)


def _as_slice(index: torch.Tensor) -> slice | None:
    """The slice an index tensor spells, when it is a run of consecutive positions."""
    a, b = int(index[0]), int(index[-1]) + 1
    return slice(a, b) if b - a == len(index) and bool((index[1:] > index[:-1]).all()) else None


def tiles_of(height: int, width: int, tile: int) -> Iterator[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of `tile`-sized blocks covering an image, row by row."""
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            yield y0, min(y0 + tile, height), x0, min(x0 + tile, width)


def output_size(step: Step, height: int, width: int) -> tuple[int, int]:
    if isinstance(step, AttentionStep):
        return height, width
    up = 2 if step.upsample else 1
    top, bottom, left, right = step.pad
    h = (height * up + top + bottom - step.kernel) // step.stride + 1
    w = (width * up + left + right - step.kernel) // step.stride + 1
    return h, w


def input_channels(step: Step) -> int:
    return int(step.conv.in_channels) if isinstance(step, ConvStep) else int(step.attn.to_q.in_features)


def bytes_per_output_px(step: Step, whole: bool = False) -> float:
    """Device bytes one output position of `step` needs beyond its live inputs and its output.

    Tiled (whole=False): the gathered input window with an im2col copy, output copies and the residual.

    whole=True is a step over a whole device buffer (`_whole_conv`, then `_conv`'s residual and scale), whose
    temporaries live in phases: the normalised and the activated input side by side; then the activated input
    with its upsampled or padded copy while the convolution runs; then the shortcut and the sum. The peak is
    the largest phase (float32). Peak RSS of one fast-mode tile, measured against this model: SD's full-width
    decoder at 72² and 96² latent 1.01 / 1.87 GB against 1.11 / 1.97; the bench VAE at 256² and 384² 0.85 /
    1.91 against 0.88 / 1.97 (an earlier model that added the phases was 1.7-1.9x too high).
    """
    c_in, c_out = input_channels(step), step.out_channels
    if isinstance(step, AttentionStep):
        return 4.0 * (2 * c_in + 4 * c_out)
    ratio = (step.stride / (2 if step.upsample else 1)) ** 2
    inp = ratio * c_in
    if not whole:
        residual = c_out if step.residual else 0
        return 4.0 * (inp * (2 + step.kernel**2) + 3 * c_out + 2 * residual)
    top, bottom, left, right = step.pad
    normalised = (2 if step.norm is not None and step.act is not None else 1) * inp
    staged = inp + (c_in if step.upsample else 0) + (inp if (top, left) != (bottom, right) else 0)
    finish = 2 * c_out if step.residual else (c_out if step.out_scale != 1.0 else 0)
    return 4.0 * max(normalised, staged, finish)


class LayerEngine:
    """Executes a program over an input tensor; see the module docstring.

    tile_px(i) gives the output tile side for step i; `frozen` switches to borrowed statistics and keys/values;
    `record` keeps this run's statistics and keys/values (the statistics pass of fast mode).
    """

    def __init__(
        self,
        program: Program,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        wrap: tuple[bool, bool] = (False, False),
        tile_px: Callable[[int], int] = lambda i: 1 << 30,
        frozen: Frozen | None = None,
        record: bool = False,
        key_chunk: int = 1 << 30,
        store: HostStore | None = None,
        on_device: bool = False,
        max_keys: int | None = None,
    ) -> None:
        self.program = program
        self.device = torch.device(device)
        self.dtype = dtype
        self.wrap = wrap
        """(top/bottom, left/right): whether the image continues across those edges (seamless textures)."""
        self.tile_px = tile_px
        self.frozen = frozen
        self.recorded = Frozen() if record else None
        self.key_chunk = key_chunk
        self.store = store or HostStore()
        self.on_device = on_device
        self.max_keys = max_keys
        """Attention keys/values pooled down to at most this many (fast mode); None: every position, exact."""

    @torch.no_grad()
    def run(self, x: torch.Tensor, sink: TileSink | None = None) -> torch.Tensor | None:
        """The program's output for input x [B, C, H, W]; streamed to `sink` instead when one is given."""
        state = self.begin({self.program.input: x})
        self.advance(state, 0, len(self.program.steps), sink)
        return None if sink is not None else state.buffers[self.program.output]

    def begin(self, buffers: dict[str, torch.Tensor], moments: dict[str, ChannelMoments] | None = None) -> RunState:
        """A run starting from named buffers.

        `moments` of those buffers may be given (a statistics pass resuming from an exact prefix passes the
        whole image's); otherwise they are measured here when this run computes its own statistics.
        """
        if moments is None:
            moments = {} if self.frozen is not None else {n: self._moments_of(b) for n, b in buffers.items()}
        return RunState(dict(buffers), dict(moments))

    @torch.no_grad()
    def advance(self, state: RunState, start: int, stop: int, sink: TileSink | None = None) -> None:
        """Run steps [start, stop) on `state`; the last step of the program streams to `sink` if one is given."""
        buffers, moments = state.buffers, state.moments
        track = self.frozen is None  # moments are only kept when statistics come from them
        last_use = self.program.last_use()
        steps = self.program.steps
        for i in range(start, stop):
            interrupts.check()
            step = steps[i]
            src = buffers[step.src]
            shape = (src.shape[0], step.out_channels, *output_size(step, src.shape[2], src.shape[3]))
            streaming = sink is not None and i == len(steps) - 1
            out: dict[str, torch.Tensor] = {}
            acc = ChannelMoments.empty(src.shape[0], step.out_channels)
            stats = self._stats(i, step, moments.get(step.src))

            def emit(y0: int, x0: int, y: torch.Tensor, out=out, acc=acc, shape=shape, streaming=streaming) -> None:
                if streaming:
                    assert sink is not None
                    sink(y0, x0, y)
                    return
                if track:
                    acc.add(y)
                if self.on_device and y.shape == shape:  # the whole buffer in one tile: keep it, no copy
                    out["dst"] = y.float()
                    return
                if "dst" not in out:  # allocated once per step (setdefault would allocate on every tile)
                    out["dst"] = self._allocate(shape)
                dst = out["dst"]
                dst[:, :, y0 : y0 + y.shape[2], x0 : x0 + y.shape[3]] = y.to(dst.device, torch.float32)

            if isinstance(step, ConvStep):
                self._conv(step, src, buffers.get(step.residual or ""), stats, self.tile_px(i), emit)
            else:
                self._attention(i, step, src, stats, self.tile_px(i), emit)
            if not streaming:
                buffers[step.dst] = out["dst"]
                if track:
                    moments[step.dst] = acc
            for name in [n for n, last in last_use.items() if last == i and n != self.program.input]:
                buffer = buffers.pop(name, None)
                moments.pop(name, None)
                if buffer is not None and not self.on_device:
                    self.store.free(buffer)

    def _allocate(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.on_device:
            return torch.empty(shape, dtype=torch.float32, device=self.device)
        return self.store.allocate(shape)

    @staticmethod
    def _moments_of(x: torch.Tensor) -> ChannelMoments:
        """Moments of a whole buffer."""
        m = ChannelMoments.empty(x.shape[0], x.shape[1])
        for y0, y1, x0, x1 in tiles_of(x.shape[2], x.shape[3], 1024):
            m.add(x[:, :, y0:y1, x0:x1])
        return m

    def _stats(self, i: int, step: Step, moments: ChannelMoments | None) -> GroupStats | None:
        norm = step.norm if isinstance(step, ConvStep) else step.attn.group_norm
        if norm is None:
            return None
        if self.frozen is not None:
            return self.frozen.stats[i]
        assert moments is not None
        stats = moments.group_norm(norm)
        if self.recorded is not None:
            self.recorded.stats[i] = stats
        return stats

    def _conv(
        self,
        step: ConvStep,
        src: torch.Tensor,
        residual: torch.Tensor | None,
        stats: GroupStats | None,
        tile: int,
        emit: Callable[[int, int, torch.Tensor], None],
    ) -> None:
        up = 2 if step.upsample else 1
        top, _, left, _ = step.pad
        h, w = output_size(step, src.shape[2], src.shape[3])
        weight = step.conv.weight
        for y0, y1, x0, x1 in tiles_of(h, w, tile):
            if (y1 - y0, x1 - x0) == (h, w) and not any(self.wrap) and src.device == self.device:
                y = self._whole_conv(step, src, stats)  # one tile is the whole buffer: pad, no gather
            else:
                rows, row_ok = window_index(y0, y1, step.stride, step.kernel, top, src.shape[2], up, self.wrap[0])
                cols, col_ok = window_index(x0, x1, step.stride, step.kernel, left, src.shape[3], up, self.wrap[1])
                win = self._normalised(step, gather(src, rows, cols).to(self.device, torch.float32), stats)
                if not bool(row_ok.all()) or not bool(col_ok.all()):
                    win = win * (row_ok[:, None] & col_ok[None, :]).to(win.device, win.dtype)
                y = F.conv2d(win.to(weight.dtype), weight, step.conv.bias, stride=step.stride)
            if residual is not None:  # y is this step's own fresh output: updated in place
                res = residual[:, :, y0:y1, x0:x1].to(self.device, weight.dtype)
                if step.shortcut is not None:
                    res = step.shortcut(res.to(step.shortcut.weight.dtype))
                y = y.add_(res)
            if step.out_scale != 1.0:
                y = y.div_(step.out_scale)
            emit(y0, x0, y)

    @staticmethod
    def _normalised(step: ConvStep, x: torch.Tensor, stats: GroupStats | None) -> torch.Tensor:
        """The step's norm (with `stats`) and activation applied to its input.

        A SiLU after the norm works in place on the norm's fresh output: one large temporary fewer (on the
        CPU a fresh buffer of this size costs more in page faults than the activation itself)."""
        if stats is not None:
            assert step.norm is not None, "statistics come only for a step with a norm (LayerEngine._stats)"
            x = stats.apply(x, step.norm)
            if isinstance(step.act, nn.SiLU):
                return F.silu(x, inplace=True)
        return step.act(x) if step.act is not None else x

    def _whole_conv(self, step: ConvStep, src: torch.Tensor, stats: GroupStats | None) -> torch.Tensor:
        """The step over a whole device buffer: norm, activation, upsample and zero padding as the module does."""
        x = self._normalised(step, src.float(), stats)
        if step.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        top, bottom, left, right = step.pad
        padding = (top, left)
        if (top, left) != (bottom, right):  # asymmetric (an encoder's downsampling): pad first
            x, padding = F.pad(x, (left, right, top, bottom)), (0, 0)
        weight = step.conv.weight
        return F.conv2d(x.to(weight.dtype), weight, step.conv.bias, stride=step.stride, padding=padding)

    def _attention(
        self,
        i: int,
        step: AttentionStep,
        src: torch.Tensor,
        stats: GroupStats | None,
        tile: int,
        emit: Callable[[int, int, torch.Tensor], None],
    ) -> None:
        attn = step.attn
        assert stats is not None
        h, w = src.shape[2], src.shape[3]

        def tokens(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            t = stats.apply(src[:, :, y0:y1, x0:x1].to(self.device, torch.float32), attn.group_norm)
            return t.flatten(2).transpose(1, 2)

        if self.frozen is not None:
            kv = self.frozen.kv[i]
        else:
            kv = self._keys_values(attn, src, tile, tokens)
            if self.recorded is not None:
                self.recorded.kv[i] = kv
        for y0, y1, x0, x1 in tiles_of(h, w, tile):
            t = tokens(y0, y1, x0, x1)
            q = split_heads(project_tokens(attn.to_q, t), attn.heads)
            o = merge_heads(attend(q, kv, float(attn.scale), self.key_chunk))
            o = attn.to_out[1](attn.to_out[0](o))
            o = o.transpose(1, 2).reshape(src.shape[0], -1, y1 - y0, x1 - x0)
            if attn.residual_connection:
                o = o + src[:, :, y0:y1, x0:x1].to(o.device, o.dtype)
            emit(y0, x0, o / attn.rescale_output_factor)

    def _keys_values(self, attn: Any, src: torch.Tensor, tile: int, tokens: Callable[..., torch.Tensor]) -> KeyValues:
        """Keys and values of every position.

        Exact by default, in tile order (attention does not care about order); with `max_keys`, laid out as
        a grid and pooled down to that many (see attention.pooled).
        """
        h, w = src.shape[2], src.shape[3]
        kv_device = self._kv_device(src)
        if self.max_keys is None:
            ks, vs = [], []
            for box in tiles_of(h, w, tile):
                t = tokens(*box)
                ks.append(split_heads(project_tokens(attn.to_k, t), attn.heads).to(kv_device))
                vs.append(split_heads(project_tokens(attn.to_v, t), attn.heads).to(kv_device))
            return KeyValues(torch.cat(ks, dim=2), torch.cat(vs, dim=2))
        inner = attn.to_k.out_features
        grids = [torch.empty(src.shape[0], inner, h, w, device=kv_device) for _ in range(2)]
        for y0, y1, x0, x1 in tiles_of(h, w, tile):
            t = tokens(y0, y1, x0, x1)
            for grid, proj in zip(grids, (attn.to_k, attn.to_v), strict=True):
                out = project_tokens(proj, t).transpose(1, 2).reshape(src.shape[0], inner, y1 - y0, x1 - x0)
                grid[:, :, y0:y1, x0:x1] = out.to(kv_device, torch.float32)
        keys, values = (self._as_grids(g, attn.heads) for g in grids)
        return pooled(keys, values, self.max_keys or 1 << 62)

    @staticmethod
    def _as_grids(t: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, H*d, h, w] -> [B, H, 1, h, w, d]: one grid of keys (or values) per image, per head."""
        b, inner, h, w = t.shape
        return t.view(b, 1, heads, inner // heads, h, w).permute(0, 2, 1, 4, 5, 3)

    def _kv_device(self, src: torch.Tensor) -> torch.device:
        """Keep all keys/values on the device when one chunk holds them all, on the host otherwise."""
        n = src.shape[2] * src.shape[3]
        return self.device if self.key_chunk >= n or self.on_device else torch.device("cpu")
