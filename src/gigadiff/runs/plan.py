"""A run's memory plan, made before any weights load: what each phase holds on the device and on the host.

From the model's config files (its modules built on the `meta` device: exact parameter counts) and, for a
`--transformer` file, its header (gigadiff.backends.footprint):

- weights: each component's bytes in the run's dtype and quantization;
- activations: the peak of live tensors of the family's own prompt encoding and of one denoiser call on a tile
  batch, traced on `meta` (no memory, no arithmetic);
- the canvas and fusion buffers: CANVAS_COPIES float32 canvases (latents, fused prediction, weights,
  the solver's history);
- the VAE phase: the tiled VAE's budget (`--vae-memory`), or less where the whole decode needs less.

Each phase's peak follows from where the offload mode keeps the weights (gigadiff.backends.placement):

| offload | encode | denoise | decode |
| --- | --- | --- | --- |
| none | all modules | denoiser, VAE (text encoders parked on the host) | denoiser, VAE |
| model | one text encoder | denoiser | VAE |
| group | VAE, two blocks of a text encoder | VAE, two blocks of the denoiser and its other layers | VAE |
| sequential | VAE, one layer | VAE, one layer of the denoiser | VAE |

On the CPU the device is the host, so each phase holds every weight. `--offload auto` takes the first mode of
none, model, group whose peaks fit the free device memory (CUDA) with FIT_MARGIN to spare; a run that fits in
none is refused nowhere, one that fits in no mode is refused before loading with what would make it fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from gigadiff.errors import GigadiffError

if TYPE_CHECKING:
    import torch

    from gigadiff.runs.resolve import Run

GB = 2**30
CANVAS_COPIES = 6
"""Float32 canvases the sampler holds at once (latents, fused prediction and its weight sums, the solver's
history and output)."""
FIT_MARGIN = 0.9
"""The share of the free device memory a plan may fill (the allocator's fragmentation, CUDA's workspace)."""
MODES = ("none", "model", "group", "sequential")
PHASES = ("encode", "denoise", "decode")


@dataclass(frozen=True)
class Phase:
    name: str
    device: int
    """Peak bytes on the device (on the CPU: in the process, beyond what it held before loading)."""
    host: int
    """Peak bytes of weights and buffers on the host beside (0 when the device is the CPU)."""


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
        return self.free is None or self.peak <= self.free * FIT_MARGIN


def item_bytes(dtype: torch.dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def module_shapes(module: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A module's parameters and buffers as (safetensors dtype name, shape), from a `meta` module."""
    import torch

    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return {name: (names.get(t.dtype, "F32"), tuple(t.shape)) for name, t in tensors}


def largest_block(module: Any, item: int) -> tuple[int, int]:
    """(bytes of the largest member of the module's block lists, bytes of everything outside those lists)."""
    import torch

    from gigadiff.backends.footprint import held_bytes

    blocks = [b for child in module.modules() if isinstance(child, torch.nn.ModuleList) for b in child]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    largest = max((held_bytes(module_shapes(b), item) for b in blocks), default=0)
    rest = sum(p.numel() * item for p in module.parameters() if id(p) not in in_blocks)
    return largest, rest


def largest_layer(module: Any, item: int) -> int:
    return max((sum(p.numel() for p in m.parameters(recurse=False)) * item for m in module.modules()), default=0)


def plan_run(run: Run, free: int | None = None, device: str | None = None) -> MemoryPlan:
    """The memory plan of `run` (resolved) on its device (`device`: this rank's, else the request's); `free`: the
    device's free bytes (default: asked of CUDA; unknown on the CPU)."""
    import torch

    from gigadiff.backends.device import dtype_name, resolve_device, resolve_dtype
    from gigadiff.backends.footprint import file_bytes, held_bytes, meta_pipeline, traced_peak
    from gigadiff.backends.pipelines import quiet_libraries
    from gigadiff.backends.quantized import denoiser_name
    from gigadiff.geometry import Tile
    from gigadiff.vae.budget import memory_budget

    request, settings, info, source = run.request, run.settings, run.info, run.source
    if source.root is None or not source.index:
        raise GigadiffError(f"model {info.name!r}: a memory plan needs a diffusers folder or hub model (its config "
                            "files)", "model")  # fmt: skip
    quiet_libraries()
    where = resolve_device(device or request.device)
    dtype = resolve_dtype(request.dtype, where, info.gpu_dtype, info.fp16_risk)
    item = item_bytes(dtype)
    denoiser_key = denoiser_name(source)
    pipe = meta_pipeline(source.root, source.index, dtype)
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    weights = {n: held_bytes(module_shapes(m), item, request.quantize if n == denoiser_key else "none")
               for n, m in modules.items()}  # fmt: skip
    if request.transformer is not None:
        weights[denoiser_key] = file_bytes(request.transformer, item)
    backend: Any = run.family.adapt(pipe, info)  # a DiffusersBackend: the plan needs a diffusers pipeline
    held: list[Any] = []
    h, w = settings.height, settings.width

    def encode() -> None:
        held.append(backend.planned_condition(settings.prompt, settings.negative, settings.guidance, (h, w),
                                              settings.conditioning_options))  # fmt: skip

    factor = info.vae_scale_factor
    tile = settings.tile // factor
    batch = settings.tile_batch

    def call(n: int) -> int:
        x = torch.empty(n, info.latent_channels, tile, tile, device="meta", dtype=torch.float32)
        t = torch.tensor(500.0)
        return traced_peak(lambda: backend.predict(x, t, cond, [Tile(0, 0, tile, tile)] * n))

    untraced = ""
    try:
        encode_peak = traced_peak(encode)
        cond = held[0]
        activations = call(batch)
    except RuntimeError as e:  # an encoder that reads its data (masks' lengths): weights only, said so
        encode_peak = activations = 0
        untraced = f"{info.family}'s prompt encoding reads its data ({str(e)[:60]}), which meta tensors do not have"
    canvas = CANVAS_COPIES * 4 * info.latent_channels * (h // factor) * (w // factor)
    vae = modules.get("vae")
    whole_decode = 0
    if vae is not None and hasattr(vae, "decode"):
        whole_decode = _vae_peak(vae, h, w, dtype)
    vae_work = min(int(memory_budget(request.vae_memory, where)), whole_decode) if whole_decode else 0
    blocks = {n: largest_block(m, item) for n, m in modules.items()}
    layers = {n: largest_layer(m, item) for n, m in modules.items()}
    if free is None and where.type == "cuda":
        free = torch.cuda.mem_get_info(where)[0]
    cpu = where.type == "cpu"

    def phases(mode: str, acts: int) -> tuple[Phase, ...]:
        return _phases(mode, cpu, weights, denoiser_key, blocks, layers, encode_peak, acts, canvas, vae_work)

    wanted = request.offload
    if cpu:
        mode = "none"
    elif wanted == "auto":
        mode = next((m for m in MODES[:3] if _fits(phases(m, activations), free)), "group")
    else:
        mode = wanted
    plan = MemoryPlan(where.type, dtype_name(dtype), mode, batch, weights, encode_peak, activations, canvas,
                      vae_work, phases(mode, activations), free, untraced=untraced)  # fmt: skip
    if not cpu:
        alternatives = {f"--offload {m}": max(p.device for p in phases(m, activations)) for m in MODES if m != mode}
        if batch > 1 and not untraced:
            alternatives["--tile-batch 1"] = max(p.device for p in phases(mode, call(1)))
        plan = replace(plan, alternatives=alternatives)
    return plan


def _fits(phases: tuple[Phase, ...], free: int | None) -> bool:
    return free is None or max(p.device for p in phases) <= free * FIT_MARGIN


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


def _phases(mode: str, cpu: bool, weights: dict[str, int], denoiser: str, blocks: dict[str, tuple[int, int]],
            layers: dict[str, int], encode_peak: int, activations: int, canvas: int,
            vae_work: int) -> tuple[Phase, ...]:  # fmt: skip
    """Each phase's device and host peaks under `mode` (see the module docstring's table)."""
    total = sum(weights.values())
    encoders = {n: b for n, b in weights.items() if n.startswith("text_encoder")}
    vae = weights.get("vae", 0)
    den = weights.get(denoiser, 0)
    if cpu:
        return (Phase("encode", total + encode_peak, 0), Phase("denoise", total + canvas + activations, 0),
                Phase("decode", total + canvas + vae_work, 0))  # fmt: skip
    if mode == "none":
        resident = total - sum(encoders.values())
        device = (total + encode_peak, resident + canvas + activations, resident + canvas + vae_work)
    elif mode == "model":
        device = (max(encoders.values(), default=0) + encode_peak, den + canvas + activations, vae + canvas + vae_work)
    elif mode == "group":
        encoder_block = max((2 * blocks[n][0] + blocks[n][1] for n in encoders), default=0)
        largest, rest = blocks.get(denoiser, (0, 0))
        device = (vae + encoder_block + encode_peak, vae + 2 * largest + rest + canvas + activations,
                  vae + canvas + vae_work)  # fmt: skip
    else:
        encoder_layer = max((layers[n] for n in encoders), default=0)
        device = (vae + encoder_layer + encode_peak, vae + layers.get(denoiser, 0) + canvas + activations,
                  vae + canvas + vae_work)  # fmt: skip
    host = {"none": sum(encoders.values()), "model": total, "group": total, "sequential": total}[mode]
    return tuple(Phase(name, d, host) for name, d in zip(PHASES, device, strict=True))


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
