"""A run's memory plan, made before any weights load: what each phase holds on the device and on the host.

From the model's config files (its modules built on the `meta` device: exact parameter counts) and, for a
`--transformer` file, its header (gigadiff.backends.footprint):

- weights: each component's bytes in the run's dtype and quantization;
- activations: the peak of live tensors of the family's own prompt encoding and of one denoiser call on a tile
  batch, traced on `meta` (no memory, no arithmetic);
- the canvas and fusion buffers: CANVAS_COPIES float32 canvases (latents, fused prediction, weights,
  the solver's history);
- the VAE phase: the tiled VAE's budget (`--vae-memory`), or less where the whole decode needs less.

Each phase's peak follows from where the offload mode keeps the weights (the table of
gigadiff.backends.placement.phase_peaks). `--offload auto` takes the first of none, model, group whose peaks fit
the free device memory (CUDA) with FIT_MARGIN to spare (placement.auto_offload, the one rule); a run that fits in no
mode is refused before loading with what would make it fit.

A plan can be made for a GPU that is not in this machine (`free` given with a CUDA device): what a run would need
on a card one has yet to buy or rent (bench/fit.py's table of models, canvases and cards).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from gigadiff.backends.placement import FIT_MARGIN, MODES, Phase, Residency, Work, auto_offload, fits, phase_peaks
from gigadiff.errors import GigadiffError, Note

if TYPE_CHECKING:
    import torch

    from gigadiff.runs.resolve import Run

LOG = logging.getLogger("gigadiff")
GB = 2**30
CANVAS_COPIES = 6
"""Float32 canvases the sampler holds at once (latents, fused prediction and its weight sums, the solver's
history and output)."""


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    dtype: str
    offload: str
    tile_batch: int
    weights: dict[str, int]
    encode_activations: int
    activations: int
    """Peak of live tensors in one denoiser call on `tile_batch` tiles."""
    canvas: int
    vae_work: int
    phases: tuple[Phase, ...]
    free: int | None = None
    """Free device memory (CUDA), or None where unknown (CPU: the host's, see `host_free`)."""
    alternatives: dict[str, int] = field(default_factory=dict)
    """What other choices would peak at on the device (`--offload model`, `--tile-batch 1`, ...)."""
    untraced: str = ""
    """Why the activations could not be traced ("" when they were): the plan then counts weights and buffers."""

    @property
    def peak(self) -> int:
        return max(p.device for p in self.phases)

    def fits(self) -> bool:
        return fits(self.phases, self.free)


def item_bytes(dtype: torch.dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Footprint:
    """What a run occupies wherever its weights are placed: traced once (the costly part of a plan), then placed
    for any free memory and offload mode (`plan`)."""

    device: str
    """The device type planned for ("cuda", "cpu", "mps")."""
    dtype: str
    held: Residency
    tile_batch: int
    encode_activations: int
    activations: dict[int, int]
    """One denoiser call's peak by tile batch: the run's and, on a GPU, each of its divisors (batches that still
    waste no call, gigadiff.grids.default_tile_batch)."""
    canvas: int
    whole_decode: int
    """The peak of an untiled decode (0 where the VAE could not be traced): the tiled VAE never takes more."""
    vae_memory: float | None
    """`--vae-memory` GB, or None for the device's default budget."""
    untraced: str = ""

    def vae_work(self, resident: int, free: int | None) -> int:
        """The tiled VAE's budget as the run will find it: `--vae-memory`, else (CUDA) half of what is free when
        the decode starts (gigadiff.vae.budget), else the CPU's default; never more than the whole decode."""
        from gigadiff.vae.budget import default_budget_gb

        left = None if free is None else free - resident
        budget = (self.vae_memory or default_budget_gb(self.device, left)) * GB
        return int(min(budget, self.whole_decode))

    def work(self, free: int | None, batch: int | None = None) -> Work:
        acts = self.activations[batch or self.tile_batch]
        return Work(self.encode_activations, acts, self.canvas, lambda resident: self.vae_work(resident, free))

    def peak(self, mode: str, free: int | None, batch: int | None = None) -> int:
        return max(p.device for p in phase_peaks(mode, self.device == "cpu", self.held, self.work(free, batch)))

    def plan(self, free: int | None, offload: str = "auto", batch: int | None = None) -> MemoryPlan:
        """The plan on a device with `free` bytes free (None: unknown) under `--offload offload`, with tile batch
        `batch` (default: the run's)."""
        cpu = self.device == "cpu"
        batch = batch or self.tile_batch
        work = self.work(free, batch)
        mode = "none" if cpu else offload if offload != "auto" else auto_offload(self.held, work, free)
        phases = phase_peaks(mode, cpu, self.held, work)
        before_decode = phase_peaks(mode, cpu, self.held, replace(work, decode=lambda resident: 0))[-1].device
        alternatives = {}
        if not cpu:
            alternatives = {f"--offload {m}": self.peak(m, free) for m in MODES if m != mode}
            if 1 in self.activations and self.tile_batch > 1:
                alternatives["--tile-batch 1"] = self.peak(mode, free, 1)
        return MemoryPlan(self.device, self.dtype, mode, batch, self.held.weights, self.encode_activations,
                          self.activations[batch], self.canvas, self.vae_work(before_decode, free), phases, free,
                          alternatives, self.untraced)  # fmt: skip

    def fitting(self, free: int | None, offload: str, lower_batch: bool) -> MemoryPlan:
        """The fastest plan that fits: the least offloading (`auto`; else the one asked) and, with `lower_batch`,
        the largest of the tile batch's divisors; where nothing fits, the plan as asked (to be refused)."""
        modes = MODES[:3] if offload == "auto" and self.device != "cpu" else (offload,)
        batches = sorted(self.activations, reverse=True) if lower_batch else [self.tile_batch]
        for mode in modes:
            for batch in batches:
                plan = self.plan(free, mode, batch)
                if plan.fits():
                    return plan
        return self.plan(free, offload)


def plan_run(run: Run, free: int | None = None, device: str | None = None) -> MemoryPlan:
    """The memory plan of `run` (resolved) on its device (`device`: this rank's, else the request's); `free`: the
    device's free bytes (default: asked of CUDA; unknown on the CPU). With `free` given, a CUDA `device` need not
    be present: the plan is then for such a GPU (bf16-capable)."""
    import torch

    from gigadiff.backends.device import resolve_device

    name = device or run.request.device
    absent = free is not None and name.startswith("cuda") and not torch.cuda.is_available()
    where = torch.device(name) if absent else resolve_device(name)
    if free is None and where.type == "cuda":
        free = torch.cuda.mem_get_info(where)[0]
    return footprint(run, where.type).plan(free, run.request.offload)


def fit(run: Run, device: str, free: int | None = None) -> tuple[Run, MemoryPlan]:
    """The run as its plan on GPU `device` (`free` bytes free; default: asked of CUDA) places it, before any
    weights load: the fastest placement that fits (`Footprint.fitting`), a default tile batch lowered to one of its
    divisors where that is what fits (said in a note), and a run that fits in no way refused naming what would."""
    import torch

    from gigadiff.backends.device import resolve_device

    where = resolve_device(device) if free is None else torch.device(device)  # CUDA missing: said here
    fp = footprint(run, where.type)
    if free is None:
        free = torch.cuda.mem_get_info(where)[0]
    plan = fp.fitting(free, run.request.offload, lower_batch=not run.tile_batch_given)
    refuse_if_unfit(plan)
    if plan.tile_batch != run.settings.tile_batch:
        note = Note(f"the default tile batch ({run.settings.tile_batch}) does not fit the {free / GB:.1f} GB free on "
                    f"the GPU: tiles run {plan.tile_batch} per call ({{tile_batch}} {plan.tile_batch})",
                    ("tile_batch",))  # fmt: skip
        LOG.warning("note: %s", note.render())
        run = run.with_tile_batch(plan.tile_batch, note)
    return run, plan


def footprint(run: Run, device_type: str) -> Footprint:
    """The footprint of `run` (resolved) on a device of `device_type`, from its model's config files (see the
    module docstring)."""
    import torch

    from gigadiff.backends.device import auto_dtype, dtype_name, resolve_dtype
    from gigadiff.backends.footprint import file_bytes, meta_pipeline, module_bytes, traced_peak
    from gigadiff.backends.pipelines import quiet_libraries
    from gigadiff.backends.quantized import denoiser_name
    from gigadiff.geometry import Tile

    request, settings, info, source = run.request, run.settings, run.info, run.source
    if source.root is None or not source.index:
        raise GigadiffError(f"model {info.name!r}: a memory plan needs a diffusers folder or hub model (its config "
                            "files)", "model")  # fmt: skip
    quiet_libraries()
    where = torch.device(device_type)
    dtype_wanted = request.dtype
    if dtype_wanted == "auto" and device_type == "cuda" and not torch.cuda.is_available():
        dtype_wanted = auto_dtype(device_type, info.gpu_dtype, info.fp16_risk)  # a GPU planned for, not here
    dtype = resolve_dtype(dtype_wanted, where, info.gpu_dtype, info.fp16_risk)
    item = item_bytes(dtype)
    denoiser_key = denoiser_name(source)
    pipe = meta_pipeline(source.root, source.index, dtype)
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}

    def quantized_as(name: str) -> str:
        return {denoiser_key: request.quantize}.get(name, request.quantize_text if name.startswith("text_encoder")
                                                    else "none")  # fmt: skip

    weights = {n: module_bytes(m, item, quantized_as(n)) for n, m in modules.items()}
    if request.transformer is not None:
        weights[denoiser_key] = file_bytes(request.transformer, item)
    backend: Any = run.family.adapt(pipe, info)  # a DiffusersBackend: the plan needs a diffusers pipeline
    conditions: list[Any] = []
    h, w = settings.height, settings.width

    def encode() -> None:
        conditions.append(backend.planned_condition(settings.prompt, settings.negative, settings.guidance, (h, w),
                                                    settings.conditioning_options))  # fmt: skip

    factor = info.vae_scale_factor
    tile = settings.tile // factor
    batch = settings.tile_batch

    def call(n: int) -> int:
        x = torch.empty(n, info.latent_channels, tile, tile, device="meta", dtype=torch.float32)
        t = torch.tensor(500.0)
        return traced_peak(lambda: backend.predict(x, t, conditions[0], [Tile(0, 0, tile, tile)] * n))

    untraced = ""
    try:
        encode_peak = traced_peak(encode)
        divisors = [n for n in range(batch, 0, -1) if batch % n == 0] if device_type != "cpu" else [batch]
        activations = {n: call(n) for n in divisors}
    except RuntimeError as e:  # an encoder that reads its data (masks' lengths): weights only, said so
        encode_peak, activations = 0, {batch: 0}
        untraced = f"{info.family}'s prompt encoding reads its data ({str(e)[:60]}), which meta tensors do not have"
    canvas = CANVAS_COPIES * 4 * info.latent_channels * (h // factor) * (w // factor)
    vae = modules.get("vae")
    whole_decode = _vae_peak(vae, h, w, dtype) if vae is not None and hasattr(vae, "decode") else 0
    return Footprint(device_type, dtype_name(dtype), Residency.of(modules, denoiser_key, item, weights), batch,
                     encode_peak, activations, canvas, whole_decode, request.vae_memory, untraced)  # fmt: skip


def _vae_peak(vae: Any, height: int, width: int, dtype: Any) -> int:
    """The peak of a whole decode of a `height` x `width` image, traced on `meta` (0 when the VAE cannot be
    traced so)."""
    import torch

    from gigadiff.backends.footprint import traced_peak

    cfg = vae.config
    stages = cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels") or cfg.get("dim_mult") or [0] * 4
    factor = 2 ** (len(stages) - 1)
    channels = cfg.get("latent_channels") or cfg.get("z_dim") or 4
    shape: tuple[int, ...] = (1, channels, height // factor, width // factor)
    for dims in (shape, (*shape[:2], 1, *shape[2:])):  # image VAEs, then video-shaped ones (Qwen-Image's)
        z = torch.empty(dims, device="meta", dtype=dtype)
        try:
            return traced_peak(partial(vae.decode, z))
        except Exception:
            continue
    return 0


def render(plan: MemoryPlan) -> str:
    """The plan as the table `gigadiff plan` prints."""

    def gb(n: int) -> str:
        return f"{n / GB:.2f} GB" if n >= GB else f"{n / 2**20:.1f} MB"

    where = "device" if plan.device != "cpu" else "process (CPU)"
    lines = [f"memory plan on {plan.device} in {plan.dtype}, offload {plan.offload}, tile batch {plan.tile_batch}", ""]
    lines += [f"  weights  {name:<16} {gb(size)}" for name, size in sorted(plan.weights.items())]
    traced = (f"encode {gb(plan.encode_activations)}, one call of {plan.tile_batch} tiles {gb(plan.activations)}"
              if not plan.untraced else f"not traced: {plan.untraced}")  # fmt: skip
    lines += [
        f"  activations  {traced}",
        f"  canvas and fusion buffers {gb(plan.canvas)}, VAE tiles {gb(plan.vae_work)}",
        "",
        f"  {'phase':<8} {where:>16} {'host':>10}",
    ]
    lines += [f"  {p.name:<8} {gb(p.device):>16} {gb(p.host):>10}" for p in plan.phases]
    if plan.free is not None:
        verdict = "fits" if plan.fits() else "does NOT fit"
        lines += ["", f"  peak {gb(plan.peak)} of {gb(plan.free)} free: {verdict}"]
    if plan.alternatives:
        lines += ["", "  alternatives: " + ", ".join(f"{k} -> {gb(v)}" for k, v in plan.alternatives.items())]
    return "\n".join(lines)


def refuse_if_unfit(plan: MemoryPlan) -> None:
    """Refuse a run whose plan does not fit, naming what would."""
    if plan.fits():
        return
    assert plan.free is not None
    fitting = [f"{k} ({v / GB:.1f} GB)" for k, v in plan.alternatives.items() if v <= plan.free * FIT_MARGIN]
    advice = (
        f"; these fit: {', '.join(fitting)}"
        if fitting
        else "; add --quantize int8, a GGUF --transformer, or a smaller --tile"
    )
    raise GigadiffError(f"the run needs {plan.peak / GB:.1f} GB on the {plan.device} at its peak "
                        f"({max(plan.phases, key=lambda p: p.device).name}), and {plan.free / GB:.1f} GB are free"
                        f"{advice}", "offload")  # fmt: skip
