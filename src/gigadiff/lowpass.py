"""The Gaussian low-pass that splits a canvas into its smooth part and its detail (level consensus, detail-
preserving fusion), with the edge rules a canvas needs: wrapped axes blur round their ring, unwrapped edges
either mirror or keep the blur's variance."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_lowpass(
    x: torch.Tensor, sigma: float, wrap: tuple[bool, bool] = (False, False), edges: str = "reflect"
) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with standard deviation `sigma` px, truncated at 3 sigma.

    A wrapped axis is blurred round its ring. At an unwrapped edge, "reflect" mirrors the image (a constant
    stays constant); "variance" averages only the pixels inside and divides by the square root of the kernel
    mass they carry, so that the blur of white noise has the same variance at the edge as inside (mirroring
    doubles it there, renormalising by the mass does too). On an axis shorter than the kernel, the kernel is
    truncated to fit.
    """
    out = x
    for axis, wraps in ((2, wrap[0]), (3, wrap[1])):
        size = x.shape[axis]
        radius = min(math.ceil(3 * sigma), size - 1 if not wraps else size // 2)
        if radius < 1:
            continue
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
        kernel = torch.exp(-(taps**2) / (2 * sigma * sigma))
        kernel = (kernel / kernel.sum()).to(x.dtype)
        channels = x.shape[1]
        if axis == 2:
            pad, weight = (0, 0, radius, radius), kernel.view(1, 1, -1, 1)
        else:
            pad, weight = (radius, radius, 0, 0), kernel.view(1, 1, 1, -1)
        mode = "circular" if wraps else ("constant" if edges == "variance" else "reflect")
        out = F.conv2d(F.pad(out, pad, mode=mode), weight.expand(channels, 1, *weight.shape[2:]), groups=channels)
        if edges == "variance" and not wraps:
            ones = torch.ones((1, 1, *out.shape[2:]), dtype=x.dtype, device=x.device)
            mass = F.conv2d(F.pad(ones, pad), weight)
            out = out / mass.sqrt()
    return out
