"""What a model occupies, found without its weights: parameter bytes from the weight files' headers, and the
activation memory of one denoiser call traced on the `meta` device.

Weights: each component's modules built from its config on the `meta` device (or, for a `--transformer` file,
its header) give its tensors' shapes; the bytes are what the run holds: floating tensors in the run's dtype, a
GGUF file's tensors as stored (its float ones in the run's dtype), int8/fp8 weights one byte each plus a scale per
row, nf4 half a byte plus a scale per 64.

Activations: the family's own code (condition, then one `predict` of a tile batch) runs on a pipeline whose
components are built from their configs on the `meta` device, where tensors have shapes and dtypes but no
memory and no arithmetic, under a dispatch mode that adds each new tensor's bytes when an operator creates it
and takes them off when Python drops it. Its peak is the call's peak of live tensors. Scaled-dot-product
attention counts as the fused kernels the run uses (CPU flash, CUDA flash/memory-efficient): its output and
log-sum-exp, never the tokens x tokens scores that the meta device's fallback would materialise.
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gigadiff.backends.source import safetensors_header

if TYPE_CHECKING:
    import torch

ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip
FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
QUANTIZED_BYTES = {"int8": 1.0, "fp8": 1.0, "nf4": 0.5}
"""Bytes per element of a quantized weight (scales aside)."""
NF4_BLOCK = 64


def held_bytes(shapes: dict[str, tuple[str, tuple[int, ...]]], item_bytes: int, quantize: str = "none") -> int:
    """Bytes the tensors take once loaded in a dtype of `item_bytes` per element, the 2-D weights of linear layers
    quantized as `quantize` says."""
    total = 0
    for name, (dtype, shape) in shapes.items():
        count = 1
        for side in shape:
            count *= side
        if dtype not in FLOATS:
            total += count * ITEM_BYTES.get(dtype, 4)
        elif quantize != "none" and len(shape) == 2 and name.endswith("weight"):
            scales = shape[0] * item_bytes if quantize != "nf4" else count // NF4_BLOCK * 4
            total += int(count * QUANTIZED_BYTES[quantize]) + scales
        else:
            total += count * item_bytes
    return total


def module_shapes(module: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A module's parameters and buffers as (safetensors dtype name, shape), from a `meta` module."""
    import torch

    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return {name: (names.get(t.dtype, "F32"), tuple(t.shape)) for name, t in tensors}


def module_bytes(module: Any, item_bytes: int, quantize: str = "none", keep: tuple[str, ...] = ("lm_head",)) -> int:
    """Bytes a module (built on `meta`) holds once loaded in a dtype of `item_bytes` per element, the weights of
    its linear layers quantized as `quantize` says, as diffusers' and transformers' quantizers do (embeddings,
    norms and an output head named in `keep` stay as they are)."""
    import torch

    total = held_bytes(module_shapes(module), item_bytes)
    if quantize == "none":
        return total
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.rpartition(".")[2] not in keep:
            count = layer.weight.numel()
            scales = layer.weight.shape[0] * item_bytes if quantize != "nf4" else count // NF4_BLOCK * 4
            total += int(count * QUANTIZED_BYTES[quantize]) + scales - count * item_bytes
    return total


def gguf_bytes(path: Path, item_bytes: int) -> int:
    """Bytes a GGUF denoiser holds: quantized tensors as stored, F32/F16 ones in the run's dtype."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    return sum(int(t.n_elements) * item_bytes if t.tensor_type in plain else int(t.n_bytes) for t in reader.tensors)


def file_bytes(path: str, item_bytes: int) -> int:
    """Bytes the denoiser in a single file (`--transformer`) holds: a GGUF's as `gguf_bytes` counts them, a
    .safetensors file's floating tensors in the run's dtype."""
    file = Path(path).expanduser()
    if file.suffix == ".gguf":
        return gguf_bytes(file, item_bytes)
    header = safetensors_header(file, "--transformer file", "transformer")
    return held_bytes({name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}, item_bytes)


def meta_pipeline(root: Path, index: dict[str, Any], dtype: torch.dtype) -> Any:
    """The model's pipeline with every module built from its config on the `meta` device in `dtype` (tokenizers,
    schedulers and processors loaded as they are: small files)."""
    import diffusers
    import torch
    import transformers

    components: dict[str, Any] = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list):
            continue
        library, class_name = spec
        if library is None:
            components[name] = None
            continue
        cls: Any = getattr(importlib.import_module(library), class_name)
        folder = root / name
        is_module = isinstance(cls, type) and issubclass(cls, torch.nn.Module)
        if is_module:
            with torch.device("meta"):
                if library == "diffusers":
                    module = cls.from_config(cls.load_config(folder))
                else:
                    module = cls._from_config(transformers.AutoConfig.from_pretrained(folder))
            components[name] = module.to(dtype).eval()
        else:
            components[name] = cls.from_pretrained(folder)
    return getattr(diffusers, index["_class_name"])(**components)


class LiveBytes:
    """A dispatch mode counting the bytes of the tensors operators create while Python holds them (see the
    module docstring)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def created(self, tensor: Any) -> None:
        n = tensor.untyped_storage().nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._dropped, n)

    def _dropped(self, n: int) -> None:
        self.live -= n

    @contextlib.contextmanager
    def counting(self) -> Iterator[LiveBytes]:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                if func.is_view or func._schema.is_mutable:
                    return out
                given = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and id(t) not in given:
                        counter.created(t)
                return out

        with fused_attention(), torch.no_grad(), Mode():
            yield counter


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """`F.scaled_dot_product_attention` as a fused kernel's memory: an output the size of the values' projection
    per query (plus a float per query and head for its log-sum-exp)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def fused(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        del lse
        return out

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def traced_peak(run: Callable[[], Any]) -> int:
    """The peak bytes of live tensors that `run` (on meta tensors) creates."""
    counter = LiveBytes()
    with counter.counting():
        kept = run()
        del kept
    return counter.peak
