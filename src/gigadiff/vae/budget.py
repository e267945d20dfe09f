"""From a memory budget to tile sizes, and the checks that refuse an impossible decode before any work starts.

Device memory (the `--vae-memory` budget) bounds what one tile of one layer may use; host memory bounds the
whole-image buffers of exact mode (which can spill to memory-mapped files). All estimates are from the program's
shapes alone — no trial runs — so they can be checked before generation begins.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from gigadiff.errors import GigadiffError
from gigadiff.vae.engine import bytes_per_output_px, input_channels, output_size
from gigadiff.vae.program import AttentionStep, Program

GB = 1024**3
MIN_TILE = 8
"""The granularity of fast-mode latent tiles (px)."""
USEFUL_TILE = 32
"""The smallest tile side (a layer's output px in exact mode, latent px in fast mode) a budget must allow: below
it the overhead of each tile (halos, kernel launches, Python) swamps the work, and a decode that takes seconds
takes minutes (a 0.0001 GB budget made a 2 s decode take 101 s). Smaller budgets are refused, naming the
smallest that works."""


SDPA_QUERY_BLOCK = 4096
"""Queries whose logits a fused scaled-dot-product attention holds at once (a generous bound: its kernels
work in blocks of a few hundred)."""
FAST_HEADROOM = 1.2
"""Whole-buffer step estimates (fast mode's tiles and prefix) are multiplied by this (allocator slack; see
fast_tile_bytes)."""
RETAIN_SHARE = 0.5
"""Fast mode keeps the buffers live at the end of its whole-image prefix while its tiles run: at most this
share of the memory budget."""


def memory_budget(memory_gb: float | None, device: torch.device) -> float:
    """The device bytes a tile may use: `--vae-memory` GB, or the device's default."""
    return (memory_gb or default_memory_gb(device)) * GB


def default_memory_gb(device: torch.device) -> float:
    """The budget when none is given, for the device's memory free now (`default_budget_gb`)."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" and torch.cuda.is_available() else None
    return default_budget_gb(device.type, free)


DEFAULT_HOST_MEMORY_GB = 2.0
"""The default budget on the CPU and MPS, where the tiles share memory with everything else."""
MIN_DEVICE_GB = 0.25


def default_budget_gb(device_type: str, free: int | None) -> float:
    """Half of what a CUDA device has free (`free` bytes) when the VAE starts, at least MIN_DEVICE_GB; else
    DEFAULT_HOST_MEMORY_GB. The memory plan (gigadiff.runs.plan) asks this with the memory its decode phase
    leaves free."""
    if device_type == "cuda" and free is not None:
        return max(MIN_DEVICE_GB, free / GB / 2)
    return DEFAULT_HOST_MEMORY_GB


def available_ram() -> int:
    """Bytes of RAM the OS could give us now (MemAvailable), or total RAM where /proc is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def shapes(program: Program, batch: int, height: int, width: int, start: int = 0) -> list[tuple[int, int, int, int]]:
    """Output shape of every step from `start` on, for an input (or buffers at `start`) of the given size."""
    out, h, w = [], height, width
    for step in program.steps[start:]:
        h, w = output_size(step, h, w)
        out.append((batch, step.out_channels, h, w))
    return out


def host_peak_bytes(program: Program, batch: int, height: int, width: int) -> int:
    """Largest total of whole-image buffers alive at once in exact mode (float32)."""
    sizes = {program.input: 0}
    last = program.last_use()
    live, peak = 0, 0
    for i, (step, shape) in enumerate(zip(program.steps, shapes(program, batch, height, width), strict=True)):
        nbytes = 4 * math.prod(shape)
        sizes[step.dst] = nbytes
        live += nbytes
        peak = max(peak, live)
        for name, used in last.items():
            if used == i:
                live -= sizes.get(name, 0)
    return peak


def layer_tiles(program: Program, budget_bytes: float) -> list[int]:
    """Exact mode: the output tile side of each step that keeps its device memory within the budget."""
    sides = [int(math.sqrt(budget_bytes / bytes_per_output_px(step))) for step in program.steps]
    if min(sides) < USEFUL_TILE:
        need = max(USEFUL_TILE**2 * bytes_per_output_px(step) for step in program.steps) / GB
        raise GigadiffError(
            f"{{vae_memory}} {budget_bytes / GB:.2g} GB is too small for this VAE: a {USEFUL_TILE}x{USEFUL_TILE} "
            f"tile of its widest layer needs {need:.2g} GB; give at least {round_up(need)}",
            "vae_memory",
        )
    return sides


def round_up(gb: float) -> str:
    """A budget to suggest: `gb` rounded up to two significant figures."""
    digits = max(0, 1 - math.floor(math.log10(gb)))
    return f"{math.ceil(gb * 10**digits) / 10**digits:g}"


def input_bytes(program: Program, batch: int, height: int, width: int) -> int:
    """Bytes of the program's float32 input of the given size."""
    return 4 * batch * height * width * input_channels(program.steps[0])


def whole_step_peaks(
    program: Program, batch: int, height: int, width: int, start: int = 0, live: dict[str, int] | None = None
) -> list[float]:
    """Device bytes at each step when the program runs over whole buffers (fast mode's tiles and statistics
    pass): the buffers still needed later (the input always: its caller holds it), the step's output and its
    working copies (float32), with FAST_HEADROOM. From step `start` on, `live` gives the bytes of the buffers
    live there (height x width is then their size); by default the run starts from the input."""
    live = dict(live) if live is not None else {program.input: input_bytes(program, batch, height, width)}
    last = program.last_use()
    peaks = []
    for i, (step, shape) in enumerate(
        zip(program.steps[start:], shapes(program, batch, height, width, start), strict=True), start
    ):
        nbytes = 4 * math.prod(shape)
        working = batch * shape[2] * shape[3] * bytes_per_output_px(step, whole=True)
        peaks.append(FAST_HEADROOM * (sum(live.values()) + nbytes + working))
        live[step.dst] = nbytes
        for name in [n for n, used in last.items() if used == i and n != program.input]:
            live.pop(name, None)
    return peaks


def whole_step_needs(
    program: Program,
    batch: int,
    height: int,
    width: int,
    kv_tokens: int,
    start: int = 0,
    live: dict[str, int] | None = None,
) -> list[float]:
    """Device bytes at each step of a whole-buffer run (arguments as for `whole_step_peaks`): its peaks plus
    every attention's keys/values (recorded or frozen, they stay to the end of the run) and, at an attention
    step, the logits of one block of at most SDPA_QUERY_BLOCK queries."""
    peaks = whole_step_peaks(program, batch, height, width, start, live)
    attention = [s.attn for s in program.steps[start:] if isinstance(s, AttentionStep)]
    kv = sum(2 * 4 * batch * kv_tokens * a.to_k.out_features for a in attention)
    needs = []
    out_shapes = shapes(program, batch, height, width, start)
    for step, peak, shape in zip(program.steps[start:], peaks, out_shapes, strict=True):
        queries = min(shape[2] * shape[3], SDPA_QUERY_BLOCK)
        logits = 4 * batch * step.attn.heads * queries * kv_tokens if isinstance(step, AttentionStep) else 0
        needs.append(peak + kv + logits)
    return needs


def statistics_fit(
    program: Program, start: int, live: dict[str, torch.Tensor], budget_bytes: float, kv_tokens: int, factor: int
) -> bool:
    """Fast mode: whether its statistics pass can run the steps from `start` over whole buffers on the device,
    the buffers live there average-pooled by `factor`, beside those buffers, within the budget (else the pass
    runs them layer by layer in tiles, gigadiff.vae.tiled.TiledVAE.statistics)."""
    batch, _, height, width = next(iter(live.values())).shape
    room = budget_bytes - sum(4 * t.numel() for t in live.values())
    h, w = -(-height // factor), -(-width // factor)
    pooled = {n: 4 * batch * t.shape[1] * h * w for n, t in live.items()}
    return max(whole_step_needs(program, batch, h, w, kv_tokens, start, pooled)) <= room


def exact_prefix(program: Program, batch: int, height: int, width: int, budget_bytes: float, kv_tokens: int) -> int:
    """Fast mode: how many leading steps run over whole buffers on the device (the whole program if it fits).

    Those steps' statistics are exact and their attention sees every position; the tile pass resumes from the
    buffers live at the prefix's end, which stay in memory meanwhile. So the prefix is the longest one whose
    every step fits the device budget, whose kept buffers take at most RETAIN_SHARE of it (they sit beside the
    tiles), and which ends where every kept buffer has one spatial size (tiles are cut from all of them
    alike). A decoder's latent-resolution layers are the usual prefix; a small image's is all of it.
    `kv_tokens`: the keys an attention step attends to.
    """
    needs = whole_step_needs(program, batch, height, width, kv_tokens)
    hw = {program.input: (height, width)}
    nbytes = {program.input: input_bytes(program, batch, height, width)}
    live = {program.input}
    last = program.last_use()
    best = 0
    for i, (step, shape) in enumerate(zip(program.steps, shapes(program, batch, height, width), strict=True)):
        if needs[i] > budget_bytes:
            break
        live.add(step.dst)
        hw[step.dst], nbytes[step.dst] = shape[2:], 4 * math.prod(shape)
        live -= {n for n, used in last.items() if used == i and n != program.input}
        kept = {n for n in live if n != program.input or last.get(n, -1) > i}
        finished = i == len(program.steps) - 1  # the output is streamed, not kept
        fits = finished or sum(nbytes[n] for n in kept) <= RETAIN_SHARE * budget_bytes
        if fits and len({hw[n] for n in kept}) == 1:
            best = i + 1
    return best


def key_chunk(program: Program, budget_bytes: float, sides: tuple[int, ...], height: int, width: int) -> int:
    """Keys per attention chunk: logits for one query tile plus the chunk's keys/values fill half the budget.

    The query tile is the attention step's own tile (`sides`), clipped to the size of the buffer it attends
    over for an input of height x width.
    """
    per_step = zip(program.steps, sides, shapes(program, 1, height, width), strict=True)
    attn = [(s.attn, min(side, shape[2]) * min(side, shape[3])) for s, side, shape in per_step
            if isinstance(s, AttentionStep)]  # fmt: skip
    if not attn:
        return 1 << 30
    (first, query_tokens) = attn[0]
    inner, heads = first.to_k.out_features, first.heads
    per_key = 4 * (2 * inner + 2 * heads * query_tokens)
    return max(64, int(budget_bytes / 2 / per_key))


def fast_tile_bytes(program: Program, batch: int, side: int, kv_tokens: int) -> float:
    """Device bytes to push one square latent tile of `side` (halo included) through the whole program.

    The step model is within about 10% of measured peaks step by step; a whole SD-width encoder tile peaks
    16% above it (measured), so whole_step_peaks includes FAST_HEADROOM."""
    return max(whole_step_needs(program, batch, side, side, kv_tokens))


def fast_tile(
    program: Program, batch: int, budget_bytes: float, halo: int, kv_tokens: int, largest: int, unit: int = 1
) -> int:
    """Fast mode: the largest tile core (a multiple of MIN_TILE*unit input px, at most `largest`) in the budget.

    `unit` is the input pixels per latent pixel (the encoder's factor; 1 for a decoder).
    """
    step = MIN_TILE * unit
    best = 0
    core = step
    while core < largest + step:
        if fast_tile_bytes(program, batch, core + 2 * halo, kv_tokens) > budget_bytes:
            break
        best = core
        core += step
    useful = min(USEFUL_TILE * unit, -(-largest // step) * step)
    if best < useful:
        need = fast_tile_bytes(program, batch, useful + 2 * halo, kv_tokens) / GB
        raise GigadiffError(
            f"{{vae_memory}} {budget_bytes / GB:.2g} GB is too small for fast tiled VAE: a useful tile "
            f"({useful // unit} latent px + {halo // unit} px halo) needs {need:.2g} GB; give at least "
            f"{round_up(need)}",
            "vae_memory",
        )
    return best


@dataclass(frozen=True)
class HostPlan:
    """Where exact mode's whole-image buffers go: RAM, or RAM plus memory-mapped files in `spill_dir`."""

    ram_bytes: float
    spill_dir: Path | None


def plan_host(peak_bytes: int, spill_dir: Path | None) -> HostPlan:
    """Keep buffers in RAM when they fit in 70% of what is available; else spill, if the disk can take it."""
    ram = 0.7 * available_ram()
    if peak_bytes <= ram:
        return HostPlan(math.inf, None)
    if spill_dir is None:
        raise GigadiffError(
            f"exact tiled VAE needs {peak_bytes / GB:.1f} GB of whole-image buffers but only {ram / GB:.1f} GB of "
            "RAM is free: use {vae_mode} fast, or give {vae_spill} DIR for memory-mapped buffers",
            "vae_mode",
            "vae_spill",
        )
    spill_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(spill_dir).free
    if peak_bytes > free + ram:
        raise GigadiffError(
            f"exact tiled VAE needs {peak_bytes / GB:.1f} GB of buffers; {spill_dir} has {free / GB:.1f} GB free"
        )
    return HostPlan(ram, spill_dir)
