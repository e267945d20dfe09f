"""ONNX Runtime sessions for denoisers shipped as .onnx files.

The execution provider follows gigadiff's --device: CUDA when asked for (or on "auto" when the installed ONNX
Runtime has it), the CPU otherwise. ONNX Runtime is imported lazily so that SD/SDXL users never load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gigadiff.errors import GigadiffError


def onnx_session(path: str | Path, device: str = "auto") -> tuple[Any, str]:
    """An InferenceSession for `path` on `device` ("auto", "cpu", "cuda" or "cuda:N"), and the device used."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise GigadiffError("ONNX models need onnxruntime: pip install onnxruntime (or onnxruntime-gpu)") from e
    available = set(ort.get_available_providers())
    has_cuda = "CUDAExecutionProvider" in available
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device.startswith("cuda"):
        if not has_cuda:
            raise GigadiffError(
                "device 'cuda' requested for an ONNX model, but the installed onnxruntime has no CUDA provider; "
                "install onnxruntime-gpu"
            )
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    elif device == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        raise GigadiffError(f"device {device!r} is not available for ONNX models; use auto, cpu or cuda")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    return session, device


def check_io(session: Any, inputs: dict[str, int], outputs: tuple[str, ...], path: str | Path) -> None:
    """Refuse, before any compute, an ONNX file whose input/output names or ranks are not the expected ones."""
    got_in = {i.name: len(i.shape) for i in session.get_inputs()}
    got_out = tuple(o.name for o in session.get_outputs())
    if got_in != inputs or not set(outputs) <= set(got_out):
        raise GigadiffError(
            f"{path} does not look like the expected model: inputs {got_in}, outputs {list(got_out)}; "
            f"expected inputs {inputs} and outputs {list(outputs)}"
        )


def run(session: Any, output: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    contiguous = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
    return session.run([output], contiguous)[0]
