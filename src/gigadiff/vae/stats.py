"""GroupNorm statistics of a whole image, gathered tile by tile and applied to any tile.

diffusers' tiled VAE normalises each tile with its own statistics; neighbouring tiles then disagree on what
"zero mean, unit variance" means, which shows as tone and colour shifts between tiles. Here a buffer's
per-channel sums are accumulated (in float64) while it is written, so the statistics of the WHOLE buffer are
known before the next layer reads it, and every tile is normalised with the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CPU_SLICE = 1 << 18
"""Values per slice when ChannelMoments takes a CPU tile apart (1 MB of float32: cache-sized)."""


@dataclass
class ChannelMoments:
    """Running per-sample, per-channel mean and sum of squared deviations (float64), and the count per channel.

    Each tile's moments are taken in its own dtype on its own device (a two-pass mean/variance, which is
    accurate); tiles are merged in float64 with Chan's parallel update, so the whole buffer's statistics are
    exact to float64 rounding without a float64 copy of any tile.
    """

    mean: torch.Tensor
    m2: torch.Tensor
    count: int = 0

    @classmethod
    def empty(cls, batch: int, channels: int) -> ChannelMoments:
        zeros = torch.zeros(batch, channels, dtype=torch.float64)
        return cls(zeros, zeros.clone())

    def add(self, tile: torch.Tensor) -> None:
        """Merge a tile [B, C, ...] (every dim after the channels is a position).

        On the CPU the tile is taken in slices of about CPU_SLICE values: torch.var_mean's kernel runs at
        ~1.4 GB/s there (20x slower than a sum), while a slice's mean and then its centred sum of squares stay
        in cache and cost about two sums.
        """
        t = tile.detach().flatten(2)
        if t.device.type != "cpu":
            var, mean = torch.var_mean(t.float(), dim=2, correction=0)
            self._merge(mean, var * t.shape[2], t.shape[2])
            return
        step = max(1, CPU_SLICE // (t.shape[0] * t.shape[1]))
        for start in range(0, t.shape[2], step):
            part = t[:, :, start : start + step].float()
            mean = part.mean(dim=2)
            m2 = torch.linalg.vector_norm(part - mean[..., None], dim=2).square()
            self._merge(mean, m2, part.shape[2])

    def _merge(self, mean: torch.Tensor, m2: torch.Tensor, n: int) -> None:
        """Chan's parallel update with a tile's mean and sum of squared deviations over n positions."""
        mean, m2 = mean.to("cpu", torch.float64), m2.to("cpu", torch.float64)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total

    def group_norm(self, norm: nn.GroupNorm) -> GroupStats:
        """Mean and 1/std per (sample, group), exactly as `norm` would compute them over the whole buffer."""
        means = self.mean.view(self.mean.shape[0], norm.num_groups, -1)
        mean = means.mean(-1)
        var = (self.m2.view(means.shape) / self.count + (means - mean[..., None]) ** 2).mean(-1)
        return GroupStats(mean, torch.rsqrt(var.clamp_min(0.0) + norm.eps))


@dataclass(frozen=True)
class GroupStats:
    """Per-(sample, group) mean and inverse standard deviation of one GroupNorm's input."""

    mean: torch.Tensor
    rstd: torch.Tensor

    def apply(self, x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
        """norm(x) for a tile x of the buffer these statistics describe (computed in float32)."""
        scale, shift = self.affine(x.shape[0], norm, x.device)
        return torch.addcmul(shift, x.float(), scale)

    def affine(self, batch: int, norm: nn.GroupNorm, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """norm with these statistics as one per-(sample, channel) scale and shift, each [batch, C, 1, 1].

        Folding the statistics into the norm's affine parameters makes normalisation a single pass over a tile.
        """
        c = norm.num_channels
        rep = c // norm.num_groups
        rstd = self.rstd.to(device, torch.float32).repeat_interleave(rep, 1)
        mean = self.mean.to(device, torch.float32).repeat_interleave(rep, 1)
        if norm.affine:
            rstd = rstd * norm.weight.float()
            shift = norm.bias.float() - mean * rstd
        else:
            shift = -mean * rstd
        return rstd.view(batch, c, 1, 1), shift.view(batch, c, 1, 1)
