"""Self-attention (with conditioning split, KV cache and optional BSA) and cross-attention to text.

Tensors inside are [B, heads, tokens, head_dim]. Conditioning: the first `c` latent frames are clean
conditioning; their tokens attend only among themselves, noise tokens attend to every token, and
conditioning tokens receive no cross-attention (exact zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longcat_convert.core.errors import LongcatError

from .bsa import BsaParams, block_sparse_attention
from .layout import Weights
from .rope import apply_rope, grid_angles

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class LayerCache:
    """One block's cached conditioning keys (after the per-head RMSNorm, before RoPE) and values."""

    keys: torch.Tensor
    values: torch.Tensor


def project_heads(w: Weights, role: str, x: torch.Tensor, parts: int, heads: int) -> list[torch.Tensor]:
    """Run a (fused) projection and split its output into `parts` tensors of [B, heads, N, d]."""
    batch, tokens, _ = x.shape
    out = w.linear(role, x).view(batch, tokens, parts, heads, -1)
    return list(out.permute(2, 0, 3, 1, 4).unbind(0))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-head RMSNorm: normalised in fp32, cast back, then scaled by the weight."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid, bsa: BsaParams | None) -> torch.Tensor:
    """Full softmax attention, or BSA when enabled and the call's grid has more than one frame.

    `grid` is the latent grid of the call; as upstream does, BSA derives the query and key frame counts
    from the token counts and the grid's (h, w).
    """
    scale = q.shape[-1] ** -0.5
    if bsa is None or grid[0] <= 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    plane = grid[1] * grid[2]
    grid_q = (q.shape[2] // plane, grid[1], grid[2])
    grid_k = (k.shape[2] // plane, grid[1], grid[2])
    return block_sparse_attention(q, k, v, grid_q, grid_k, bsa)


def self_attention(w: Weights, prefix: str, x: torch.Tensor, grid: Grid, heads: int, num_cond_latents: int = 0,
                   bsa: BsaParams | None = None) -> tuple[torch.Tensor, LayerCache]:
    """Self-attention over the whole grid; also returns this call's (k, v) as a cache entry."""
    tokens = x.shape[1]
    q, k, v = project_heads(w, prefix + "attn.qkv", x, 3, heads)
    q = rms_norm(q, w.tensor(prefix + "attn.q_norm", "weight"))
    k = rms_norm(k, w.tensor(prefix + "attn.k_norm", "weight"))
    cache = LayerCache(k, v)
    angles = grid_angles(grid, q.shape[-1], q.device)
    q, k = apply_rope(q, angles), apply_rope(k, angles)
    if num_cond_latents > 0:
        split = num_cond_latents * (tokens // grid[0])
        cond = attend(q[:, :, :split], k[:, :, :split], v[:, :, :split], grid, bsa)
        noise = attend(q[:, :, split:], k, v, grid, bsa)
        out = torch.cat([cond, noise], dim=2)
    else:
        out = attend(q, k, v, grid, bsa)
    return w.linear(prefix + "attn.proj", merge_heads(out)), cache


def self_attention_cached(w: Weights, prefix: str, x: torch.Tensor, grid: Grid, heads: int, cache: LayerCache,
                          bsa: BsaParams | None = None) -> torch.Tensor:
    """Noise tokens attend to [cached conditioning, themselves]; RoPE runs over the concatenated grid."""
    batch, tokens, _ = x.shape
    q, k, v = project_heads(w, prefix + "attn.qkv", x, 3, heads)
    q = rms_norm(q, w.tensor(prefix + "attn.q_norm", "weight"))
    k = rms_norm(k, w.tensor(prefix + "attn.k_norm", "weight"))
    cached_k, cached_v = _batch_cache(cache, batch, k)
    cond_frames = cached_k.shape[2] // (grid[1] * grid[2])
    full_grid = (grid[0] + cond_frames, grid[1], grid[2])
    angles = grid_angles(full_grid, q.shape[-1], q.device)
    k_full = apply_rope(torch.cat([cached_k, k], dim=2), angles)
    v_full = torch.cat([cached_v, v], dim=2)
    q = apply_rope(q, angles[-tokens:])
    out = attend(q, k_full, v_full, grid, bsa)
    return w.linear(prefix + "attn.proj", merge_heads(out))


def _batch_cache(cache: LayerCache, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = cache.keys.to(like.device, like.dtype), cache.values.to(like.device, like.dtype)
    if keys.shape[0] == batch:
        return keys, values
    if keys.shape[0] == 1:
        return keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)
    raise LongcatError(f"KV cache has batch {keys.shape[0]}; expected 1 or {batch}")


def cross_attention(w: Weights, prefix: str, x: torch.Tensor, text: torch.Tensor, key_mask: torch.Tensor | None,
                    heads: int, cond_tokens: int = 0) -> torch.Tensor:
    """Attention from video tokens to text tokens; the first `cond_tokens` tokens get exact zeros."""
    batch, tokens, channels = x.shape
    queries = x[:, cond_tokens:]
    (q,) = project_heads(w, prefix + "cross_attn.q_linear", queries, 1, heads)
    k, v = project_heads(w, prefix + "cross_attn.kv_linear", text, 2, heads)
    q = rms_norm(q, w.tensor(prefix + "cross_attn.q_norm", "weight"))
    k = rms_norm(k, w.tensor(prefix + "cross_attn.k_norm", "weight"))
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = w.linear(prefix + "cross_attn.proj", merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
    if cond_tokens == 0:
        return out
    return torch.cat([out.new_zeros(batch, cond_tokens, channels), out], dim=1)
