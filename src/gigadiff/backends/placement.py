"""Where a pipeline's weights live during a run: all on the device, or offloaded by diffusers' own mechanisms.

- `none`: every component on the device, except the text encoders, which wait on the host between encodings
  (gigadiff.backends.adapter.DiffusersBackend.encoding): prompts are encoded once, before denoising.
- `model`: `enable_model_cpu_offload`: one whole model at a time on the device (the text encoders while they
  encode, the denoiser while it denoises, the VAE while it decodes), the others on the host.
- `group`: `enable_group_offload` at block level: the denoiser's and text encoders' blocks come to the device one
  group at a time (on CUDA streams that prefetch the next group while one computes); the VAE stays on the device.
- `sequential`: `enable_sequential_cpu_offload`: every layer's weights come to the device for its own forward
  only (the least memory, the slowest); the VAE stays on the device.

gigadiff's tiled VAEs read the VAE's layers one by one rather than calling its `forward`, which is where the
offload hooks act; so the VAE is either kept whole on the device (group, sequential: it is small beside the
denoiser) or brought there whole before a VAE phase (`activate`, model offload). Everything gigadiff creates
itself (the canvas, noise, fusion buffers) goes to the pipeline's execution device (`execution_device`), never to
`denoiser.device`, which is the host (or `meta`) under offloading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ON_DEVICE = ("vae",)
"""Components kept whole on the device under group and sequential offloading (see the module docstring)."""


def place(pipe: Any, device: torch.device, mode: str) -> None:
    """Put `pipe`'s components where `mode` (not `auto`: resolved before) says, on execution device `device`."""
    import torch

    if mode == "none":
        if device.type == "cpu":
            pipe.to(device)
            return
        for name, component in pipe.components.items():  # the text encoders stay on the host until they encode
            if isinstance(component, torch.nn.Module) and not name.startswith("text_encoder"):
                component.to(device)
    elif mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "group":
        kept = [name for name in ON_DEVICE if name in pipe.components]
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                                  num_blocks_per_group=1, use_stream=device.type == "cuda",
                                  exclude_modules=kept)  # fmt: skip
    elif mode == "sequential":
        pipe._exclude_from_cpu_offload = [*pipe._exclude_from_cpu_offload, *ON_DEVICE]
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"unknown offload mode {mode!r}")


def offloading(pipe: Any) -> str:
    """The offload mode a pipeline is under ("none" when it has no offload hooks), as `place` names them; for a
    pipeline gigadiff loaded and for one a caller passed in alike."""
    from diffusers.hooks.group_offloading import _get_group_onload_device

    if getattr(pipe, "_all_hooks", None):
        return "model"
    for component in _modules(pipe):
        try:
            _get_group_onload_device(component)
            return "group"
        except ValueError:
            pass
        if any(hasattr(m, "_hf_hook") for m in component.modules()):
            return "sequential"
    return "none"


def execution_device(pipe: Any, denoiser: Any) -> torch.device:
    """Where the pipeline computes: the offload hooks' device, else the denoiser's."""
    return pipe._execution_device if offloading(pipe) != "none" else denoiser.device


def activate(pipe: Any, module: Any) -> None:
    """Bring `module` whole onto the execution device before gigadiff uses its layers directly (a VAE phase), and
    under model offloading the other models off it, as the hook of the model in use does for its `forward`."""
    for hook in getattr(pipe, "_all_hooks", ()):
        if hook.model is not module:
            hook.offload()
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


def host_tensor(module: Any, name: str) -> torch.Tensor:
    """Parameter `name` of `module` as stored: on its device, or under sequential offloading (where the module
    holds `meta` tensors) from the host copy its offload hook keeps."""
    tensor = module.get_parameter(name)
    if tensor.device.type != "meta":
        return tensor
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    hook = getattr(owner, "_hf_hook", None)
    return hook.weights_map[leaf] if hook is not None else tensor  # a module built on `meta` has no data


def _modules(pipe: Any) -> list[Any]:
    import torch

    return [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]


FIT_MARGIN = 0.9
"""The share of the free device memory a run may fill (the allocator's fragmentation, CUDA's workspace)."""
MODES = ("none", "model", "group", "sequential")
PHASES = ("encode", "denoise", "decode")
UNPLANNED_WORK = 0.25
"""Where no plan was made (a single-file checkpoint: no config files to trace), the share of the free memory
counted for what is not weights (a tile batch's activations, the canvas)."""


@dataclass(frozen=True)
class Phase:
    name: str
    device: int
    """Peak bytes on the device (on the CPU: in the process, beyond what it held before loading)."""
    host: int
    """Peak bytes of weights and buffers on the host beside (0 when the device is the CPU)."""


@dataclass(frozen=True)
class Residency:
    """What each component's weights occupy, in the terms the offload modes move them by (bytes)."""

    weights: dict[str, int]
    """Each component's weights, by pipeline component name."""
    denoiser: str
    blocks: dict[str, tuple[int, int]]
    """Per component: (its largest block, everything outside its block lists), as group offloading moves them."""
    layers: dict[str, int]
    """Per component: its largest layer, as sequential offloading moves them."""

    @classmethod
    def of(cls, modules: dict[str, Any], denoiser: str, item: int, weights: dict[str, int] | None = None) -> Residency:
        """From the pipeline's modules (built on `meta` or loaded) in a dtype of `item` bytes per element; `weights`
        where they are known better than the modules' own parameters (quantized, GGUF files), in which case the
        blocks and layers shrink with their component's weights."""
        plain = {name: sum(p.numel() * item for p in m.parameters()) for name, m in modules.items()}
        held = weights or {name: sum(p.numel() * p.element_size() for p in m.parameters())
                           for name, m in modules.items()}  # fmt: skip
        shrink = {n: held[n] / plain[n] if weights and plain[n] else 1.0 for n in modules}  # quantized weights

        def scaled(size: int, name: str) -> int:
            return int(size * min(1.0, shrink[name]))

        blocks = {n: largest_block(m, item) for n, m in modules.items()}
        return cls(held, denoiser, {n: (scaled(b, n), scaled(r, n)) for n, (b, r) in blocks.items()},
                   {n: scaled(largest_layer(m, item), n) for n, m in modules.items()})  # fmt: skip


@dataclass(frozen=True)
class Work:
    """The bytes a run needs beside its weights in each phase."""

    encode: int = 0
    """The prompt encoding's activations."""
    denoise: int = 0
    """One denoiser call's activations on a tile batch."""
    canvas: int = 0
    """The canvas and fusion buffers, held from denoising through decoding."""
    decode: Callable[[int], int] = lambda resident: 0
    """The VAE's working memory given the bytes resident on the device when it starts (its default budget is a
    share of what is then free)."""


def phase_peaks(mode: str, cpu: bool, held: Residency, work: Work) -> tuple[Phase, ...]:
    """Each phase's device and host peaks under offload `mode`:

    | offload | encode | denoise | decode |
    | --- | --- | --- | --- |
    | none | all modules | denoiser, VAE (text encoders parked on the host) | denoiser, VAE |
    | model | one text encoder | denoiser | VAE |
    | group | VAE, two blocks of a text encoder | VAE, two blocks of the denoiser and its other layers | VAE |
    | sequential | VAE, one layer | VAE, one layer of the denoiser | VAE |

    On the CPU the device is the host, so each phase holds every weight.
    """
    weights = held.weights
    total = sum(weights.values())
    encoders = {n: b for n, b in weights.items() if n.startswith("text_encoder")}
    vae = weights.get("vae", 0)
    den = weights.get(held.denoiser, 0)
    if cpu:
        return (Phase("encode", total + work.encode, 0), Phase("denoise", total + work.canvas + work.denoise, 0),
                Phase("decode", total + work.canvas + work.decode(total + work.canvas), 0))  # fmt: skip
    if mode == "none":
        resident = total - sum(encoders.values())
        encode, denoise, decode = total, resident, resident
    elif mode == "model":
        encode, denoise, decode = max(encoders.values(), default=0), den, vae
    elif mode == "group":
        encoder_block = max((2 * held.blocks[n][0] + held.blocks[n][1] for n in encoders), default=0)
        largest, rest = held.blocks.get(held.denoiser, (0, 0))
        encode, denoise, decode = vae + encoder_block, vae + 2 * largest + rest, vae
    else:
        encoder_layer = max((held.layers[n] for n in encoders), default=0)
        encode, denoise, decode = vae + encoder_layer, vae + held.layers.get(held.denoiser, 0), vae
    decode += work.canvas
    device = (encode + work.encode, denoise + work.canvas + work.denoise, decode + work.decode(decode))
    host = {"none": sum(encoders.values()), "model": total, "group": total, "sequential": total}[mode]
    return tuple(Phase(name, d, host) for name, d in zip(PHASES, device, strict=True))


def fits(phases: tuple[Phase, ...], free: int | None) -> bool:
    return free is None or max(p.device for p in phases) <= free * FIT_MARGIN


def auto_offload(held: Residency, work: Work, free: int | None) -> str:
    """What `--offload auto` picks: the first of none, model, group whose every phase fits FIT_MARGIN of the free
    device memory (group when none does: the plan then refuses the run or names what would fit)."""
    return next((m for m in MODES[:3] if fits(phase_peaks(m, False, held, work), free)), "group")


def largest_block(module: Any, item: int) -> tuple[int, int]:
    """(bytes of the largest member of the module's block lists, bytes of everything outside those lists)."""
    import torch

    from gigadiff.backends.footprint import held_bytes, module_shapes

    blocks = [b for child in module.modules() if isinstance(child, torch.nn.ModuleList) for b in child]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    largest = max((held_bytes(module_shapes(b), item) for b in blocks), default=0)
    rest = sum(p.numel() * item for p in module.parameters() if id(p) not in in_blocks)
    return largest, rest


def largest_layer(module: Any, item: int) -> int:
    return max((sum(p.numel() for p in m.parameters(recurse=False)) * item for m in module.modules()), default=0)


def placement(offload: str, pipe: Any, device: torch.device) -> str:
    """The offload mode a run on `device` uses for `--offload offload`: `none` on the CPU, where the weights are in
    host memory already; `auto` (where no plan chose before loading: gigadiff.runs.plan): `none` on MPS (memory
    shared with the host), else `auto_offload` on the loaded components with UNPLANNED_WORK of the GPU's free
    memory counted for the rest."""
    import torch

    if device.type == "cpu":
        return "none"
    if offload != "auto":
        return offload
    if device.type != "cuda":
        return "none"
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    from gigadiff.backends.quantized import DENOISERS

    denoiser = next((name for name in DENOISERS if name in modules), "")
    item = next(iter(modules[denoiser].parameters())).element_size() if denoiser else 2
    free, _ = torch.cuda.mem_get_info(device)
    return auto_offload(Residency.of(modules, denoiser, item), Work(denoise=int(free * UNPLANNED_WORK)), free)
