"""Input embeddings: 3D patches, timesteps (sinusoid + MLP, fp32) and captions (MLP + zero padding)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longcat_convert.core.errors import LongcatError

from .layout import Weights


def patch_embed(w: Weights, latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, N, hidden] tokens in (t, h, w) row-major order."""
    tokens = F.conv3d(latents, w.tensor("x_embedder.proj", "weight"), w.tensor("x_embedder.proj", "bias"),
                      stride=patch)
    return tokens.flatten(2).transpose(1, 2)


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """[N] -> [N, dim]: cos(t·f_i) then sin(t·f_i), f_i = max_period^(-i/half); zero column if dim is odd."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def timestep_embedding(w: Weights, timestep: torch.Tensor, frequency_dim: int) -> torch.Tensor:
    """Per-frame timesteps [B, T] (fp32) -> [B, T, A] fp32; the MLP runs in fp32 whatever the weights' dtype."""
    frequencies = timestep_frequencies(timestep.flatten(), frequency_dim)
    hidden = F.silu(w.linear("t_embedder.mlp.0", frequencies, fp32=True))
    return w.linear("t_embedder.mlp.2", hidden, fp32=True).reshape(*timestep.shape, -1)


def caption_embedding(w: Weights, text: torch.Tensor, mask: torch.Tensor | None,
                      zero_pad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Project text [B, L, C_cap]; returns (tokens [B, L, hidden], key mask [B, L] or None = attend to all).

    With `zero_pad` the padded positions are zeroed *after* the projection and stay attendable, so each
    contributes the key/value of a zero input. Without it, padded positions are dropped from attention.
    """
    hidden = F.gelu(w.linear("y_embedder.y_proj.0", text), approximate="tanh")
    tokens = w.linear("y_embedder.y_proj.2", hidden)
    if mask is None:
        return tokens, None
    if mask.shape != text.shape[:2]:
        raise LongcatError(f"encoder_attention_mask has shape {list(mask.shape)}, expected {list(text.shape[:2])}")
    if zero_pad:
        return tokens * mask[:, :, None].to(tokens.dtype), None
    keep = mask != 0
    if not bool(keep.any(dim=1).all()):
        raise LongcatError("a sample has no valid text token; cross-attention would be undefined")
    return tokens, keep
