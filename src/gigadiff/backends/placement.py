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


WORKING_SHARE = 0.25
"""The share of the device's free memory `auto` leaves for what is not weights (a tile batch's activations, the
canvas, the VAE's tiles; the VAE budget defaults to half the free memory but only while the VAE runs)."""


def choose_offload(sizes: dict[str, int], free_bytes: float) -> str:
    """What `--offload auto` picks from the components' weight bytes (`sizes`, by pipeline component name) and the
    device's free memory: nothing offloaded when the models fit together (text encoders come to the device all
    together, while they encode); whole models in turn when the largest one fits; else blocks in turn."""
    usable = free_bytes * (1 - WORKING_SHARE)
    encoders = [size for name, size in sizes.items() if name.startswith("text_encoder")]
    rest = sum(size for name, size in sizes.items() if not name.startswith("text_encoder"))
    if rest + sum(encoders) <= usable:
        return "none"
    if max(sizes.values(), default=0) <= usable:
        return "model"
    return "group"


def placement(offload: str, pipe: Any, device: torch.device) -> str:
    """The offload mode a run on `device` uses for `--offload offload`: `none` on the CPU, where the weights are in
    host memory already; `auto`: `none` on MPS (memory shared with the host), else `choose_offload` with the
    GPU's free memory."""
    import torch

    if device.type == "cpu":
        return "none"
    if offload != "auto":
        return offload
    if device.type != "cuda":
        return "none"
    sizes = {name: sum(p.numel() * p.element_size() for p in module.parameters())
             for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}  # fmt: skip
    free, _ = torch.cuda.mem_get_info(device)
    return choose_offload(sizes, free)
