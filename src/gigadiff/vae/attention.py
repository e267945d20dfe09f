"""Self-attention over every position of an image, one block of queries at a time.

The VAE mid-block attends over the whole latent, so no tile can compute it alone. Keys and values of all
positions are kept (on the host when they do not fit the device); each query block walks the keys in chunks
with an online softmax (running max and denominator), which gives the exact result while device memory holds
only one query block and one key chunk.
"""

from __future__ import annotations

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


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
    """softmax(q k^T * scale) v for q [B, H, n, d] against keys/values [B, H, N, d] (any device), exactly.

    Keys and values are moved to q's device `chunk` positions at a time; one chunk covering all keys is plain
    scaled-dot-product attention. Keys of B images serve a query batch of B*k cells (k consecutive per image).
    """
    if keys.shape[0] != q.shape[0]:
        keys = keys.repeat_interleave(q.shape[0] // keys.shape[0], dim=0)
        values = values.repeat_interleave(q.shape[0] // values.shape[0], dim=0)
    n_keys = keys.shape[2]
    if chunk >= n_keys:
        k = keys.to(q.device, q.dtype)
        v = values.to(q.device, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    qf = q.float()
    best = torch.full((*q.shape[:3], 1), float("-inf"), device=q.device)
    denom = torch.zeros_like(best)
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for start in range(0, n_keys, chunk):
        k = keys[:, :, start : start + chunk].to(q.device, torch.float32)
        v = values[:, :, start : start + chunk].to(q.device, torch.float32)
        logits = torch.matmul(qf, k.transpose(-1, -2)) * scale
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
