"""Self-attention over every position of an image, one block of queries at a time.

The VAE mid-block attends over the whole latent, so no tile can compute it alone. Keys and values of all
positions are kept (on the host when they do not fit the device); each query block walks the keys in chunks
with an online softmax (running max and denominator), which gives the exact result while device memory holds
only one query block and one key chunk.

Whole-image attention costs (positions)^2: at 4096^2 px the SD VAE's mid-block is most of the decode. Fast
mode therefore attends to *pooled* keys/values: each f x f block of positions becomes one key (the mean key)
and one value (the mean value) whose logit is raised by log(f^2), so a block of similar keys gets the softmax
mass its f^2 members would get. The cost becomes linear in the image; the error is measured in tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads*d] -> [B, heads, N, d]."""
    b, n, inner = x.shape
    return x.view(b, n, heads, inner // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> [B, N, heads*d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


@dataclass(frozen=True)
class KeyValues:
    """Keys and values [B, H, N, d] of the positions a query attends to; `log_weight` [N] (pooled ones) or None."""

    keys: torch.Tensor
    values: torch.Tensor
    log_weight: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.keys.shape[2])


def pooled(grid_keys: torch.Tensor, grid_values: torch.Tensor, max_tokens: int) -> KeyValues:
    """Keys/values laid out as [B, H, G, h, w, d] (G grids of h x w positions) pooled to at most max_tokens.

    The pooling factor f is the smallest that fits; edge blocks average their real members only and weigh
    log(members). f = 1 returns the tokens unchanged.
    """
    b, heads, g, h, w, d = grid_keys.shape
    f = 1
    while g * math.ceil(h / f) * math.ceil(w / f) > max_tokens:
        f += 1
    if f == 1:
        return KeyValues(grid_keys.reshape(b, heads, -1, d), grid_values.reshape(b, heads, -1, d))

    def pool(t: torch.Tensor) -> torch.Tensor:  # [B, H, G, h, w, d] -> [B, H, G*h'*w', d]
        planes = t.permute(0, 1, 2, 5, 3, 4).reshape(b * heads * g, d, h, w).float()
        p = F.avg_pool2d(planes, f, ceil_mode=True, count_include_pad=False)
        return p.view(b, heads, g, d, -1).transpose(3, 4).reshape(b, heads, -1, d)

    ones = torch.ones(1, 1, h, w, device=grid_keys.device)
    members = F.avg_pool2d(ones, f, ceil_mode=True, divisor_override=1).flatten().repeat(g)
    return KeyValues(pool(grid_keys), pool(grid_values), members.log())


def attend(q: torch.Tensor, kv: KeyValues, scale: float, chunk: int) -> torch.Tensor:
    """softmax(q k^T * scale + log_weight) v for q [B, H, n, d] against `kv` (any device), exactly.

    Keys and values are moved to q's device `chunk` positions at a time; one chunk covering all keys is plain
    scaled-dot-product attention.
    """
    keys, values, bias = kv.keys, kv.values, kv.log_weight
    n_keys = keys.shape[2]
    if chunk >= n_keys:
        k = keys.to(q.device, q.dtype)
        v = values.to(q.device, q.dtype)
        if bias is None:  # contiguous operands: strided ones send SDPA to its O(n^2)-memory path
            return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=scale)
        # The log-weights ride in one extra head dimension (q: 1/scale, k: log-weight, v: 0) rather than an
        # attention mask, which would also force the O(n^2)-memory path.
        b = bias.to(q.device, q.dtype).view(1, 1, -1, 1).expand(*k.shape[:3], 1)
        q1 = torch.cat([q, torch.full((*q.shape[:3], 1), 1 / scale, dtype=q.dtype, device=q.device)], dim=-1)
        v1 = torch.cat([v, torch.zeros_like(b)], dim=-1)
        out = F.scaled_dot_product_attention(q1, torch.cat([k, b], dim=-1), v1, scale=scale)
        return out[..., :-1]
    qf = q.float()
    best = torch.full((*q.shape[:3], 1), float("-inf"), device=q.device)
    denom = torch.zeros_like(best)
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for start in range(0, n_keys, chunk):
        k = keys[:, :, start : start + chunk].to(q.device, torch.float32)
        v = values[:, :, start : start + chunk].to(q.device, torch.float32)
        logits = torch.matmul(qf, k.transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + bias[start : start + chunk].to(q.device, torch.float32)
        new_best = torch.maximum(best, logits.amax(dim=-1, keepdim=True))
        correction = torch.exp(best - new_best)
        weights = torch.exp(logits - new_best)
        denom = denom * correction + weights.sum(dim=-1, keepdim=True)
        acc = acc * correction + torch.matmul(weights, v)
        best = new_best
    return (acc / denom).to(q.dtype)


def project_tokens(linear: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Apply a q/k/v projection to tokens [B, n, C] in the layer's own dtype and device."""
    w = linear.weight
    return linear(tokens.to(w.device, w.dtype))
