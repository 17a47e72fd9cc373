"""The avatar DiT's self-attention: the base projections, RMSNorm and 3D RoPE, with the avatar's conditioning
modes (upstream `avatar/attention.py`, `Attention.forward` / `forward_with_kv_cache`):

* c = 0: full attention; c = 1: the conditioning frame attends itself, noise attends everything (as the base).
* c > 1 (continuation, needs a reference latent): latent frame 0 is the reference and attends only itself,
  frames 1..c−1 attend each other (not the reference), noise attends reference + conditioning + noise.
  With `mask_frame_range` m > 0 the noise frames [s, e), s = ref_img_index − m − c + n_ref,
  e = ref_img_index + m − c + n_ref + 1, attend without the reference frame, if 0 ≤ s < e ≤ #noise frames.
* RoPE: with a reference, temporal positions are [ref_img_index, 0, 1, …]; else 0, 1, ….
* KV cache: built with c = all frames (reference + conditioning), holding RMS-normed keys before RoPE; a cached
  call RoPEs the concatenated grid with the same rule and applies the same masking (#noise = the call's frames).

Besides its output, a call returns the rotated queries of the noise tokens and the rotated keys of the first
latent frame: the multi-speaker attention map is computed from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longcat_convert.core.errors import LongcatError

from ..attention import LayerCache, _batch_cache, attend, merge_heads, project_heads, rms_norm
from ..bsa import BsaParams
from ..layout import Weights
from ..rope import apply_rope, frame_grid_angles

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class Reference:
    """How the reference latent is placed: `num_ref_latents` and `ref_img_index` as upstream's forward takes them
    (None = not given), and `mask_frame_range`."""

    num_ref_latents: int | None = None
    ref_img_index: int | None = None
    mask_frame_range: int | None = None

    @property
    def placed(self) -> bool:
        """Upstream moves the reference's RoPE position only when both numbers are given."""
        return self.num_ref_latents is not None and self.ref_img_index is not None

    def masked_noise_frames(self, num_cond_latents: int, noise_frames: int) -> tuple[int, int] | None:
        """The noise frames [s, e) that must not see the reference frame, or None."""
        if self.mask_frame_range is None or self.mask_frame_range <= 0:
            return None
        if not self.placed:
            raise LongcatError(f"mask_frame_range {self.mask_frame_range} needs num_ref_latents and ref_img_index")
        offset = self.ref_img_index - num_cond_latents + self.num_ref_latents
        start, end = offset - self.mask_frame_range, offset + self.mask_frame_range + 1
        return (start, end) if 0 <= start < end <= noise_frames else None


@dataclass(frozen=True)
class SelfAttentionResult:
    output: torch.Tensor  # [B, N, hidden] after proj
    noise_queries: torch.Tensor  # [B, heads, N_noise, d] after RoPE
    first_frame_keys: torch.Tensor  # [B, heads, h·w, d] after RoPE
    entry: LayerCache | None  # this call's keys/values before RoPE (no-cache calls only)


def rope_angles(grid: Grid, head_dim: int, reference: Reference, device: torch.device) -> torch.Tensor:
    frames = grid[0]
    if reference.placed:
        if reference.num_ref_latents != 1:
            raise LongcatError(f"a placed reference (ref_img_index {reference.ref_img_index}) needs num_ref_latents 1, "
                               f"got {reference.num_ref_latents}")
        positions = (float(reference.ref_img_index), *(float(t) for t in range(frames - 1)))
    else:
        positions = tuple(float(t) for t in range(frames))
    return frame_grid_angles(positions, grid[1], grid[2], head_dim).to(device)


def avatar_self_attention(w: Weights, prefix: str, x: torch.Tensor, grid: Grid, heads: int, num_cond_latents: int,
                          reference: Reference, bsa: BsaParams | None = None) -> SelfAttentionResult:
    plane = grid[1] * grid[2]
    q, k, v = project_heads(w, prefix + "attn.qkv", x, 3, heads)
    q = rms_norm(q, w.tensor(prefix + "attn.q_norm", "weight"))
    k = rms_norm(k, w.tensor(prefix + "attn.k_norm", "weight"))
    entry = LayerCache(k, v)
    angles = rope_angles(grid, q.shape[-1], reference, q.device)
    q, k = apply_rope(q, angles), apply_rope(k, angles)
    split = num_cond_latents * plane
    if num_cond_latents == 0:
        out = attend(q, k, v, grid, bsa)
    elif num_cond_latents == 1:
        out = torch.cat([attend(q[:, :, :split], k[:, :, :split], v[:, :, :split], grid, bsa),
                         attend(q[:, :, split:], k, v, grid, bsa)], dim=2)
    else:
        if not reference.placed:
            raise LongcatError(f"num_cond_latents {num_cond_latents} > 1 (continuation) needs num_ref_latents and "
                               "ref_img_index")
        parts = [attend(q[:, :, :plane], k[:, :, :plane], v[:, :, :plane], grid, bsa),
                 attend(q[:, :, plane:split], k[:, :, plane:split], v[:, :, plane:split], grid, bsa)]
        if num_cond_latents < grid[0]:
            masked = reference.masked_noise_frames(num_cond_latents, grid[0] - num_cond_latents)
            parts.append(_noise_attention(q[:, :, split:], k, v, grid, plane, masked, bsa))
        out = torch.cat(parts, dim=2)
    output = w.linear(prefix + "attn.proj", merge_heads(out))
    return SelfAttentionResult(output, q[:, :, split:], k[:, :, :plane], entry)


def avatar_self_attention_cached(w: Weights, prefix: str, x: torch.Tensor, grid: Grid, heads: int,
                                 cache: LayerCache, reference: Reference, bsa: BsaParams | None = None
                                 ) -> SelfAttentionResult:
    """x holds only noise tokens; they attend [cached reference + conditioning, themselves]."""
    batch, tokens, _ = x.shape
    plane = grid[1] * grid[2]
    q, k, v = project_heads(w, prefix + "attn.qkv", x, 3, heads)
    q = rms_norm(q, w.tensor(prefix + "attn.q_norm", "weight"))
    k = rms_norm(k, w.tensor(prefix + "attn.k_norm", "weight"))
    cached_k, cached_v = _batch_cache(cache, batch, k)
    cond_frames = cached_k.shape[2] // plane
    angles = rope_angles((grid[0] + cond_frames, grid[1], grid[2]), q.shape[-1], reference, q.device)
    k_full = apply_rope(torch.cat([cached_k, k], dim=2), angles)
    v_full = torch.cat([cached_v, v], dim=2)
    q = apply_rope(q, angles[-tokens:])
    masked = reference.masked_noise_frames(cond_frames, grid[0])
    out = _noise_attention(q, k_full, v_full, grid, plane, masked, bsa)
    return SelfAttentionResult(w.linear(prefix + "attn.proj", merge_heads(out)), q, k_full[:, :, :plane], None)


def _noise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid, plane: int,
                     masked: tuple[int, int] | None, bsa: BsaParams | None) -> torch.Tensor:
    """Noise queries against all keys; those of the masked frames against every key but the reference frame's
    (block-sparse attention is off for the three pieces, as upstream switches it off there)."""
    if masked is None:
        return attend(q, k, v, grid, bsa)
    start, end = masked[0] * plane, masked[1] * plane
    return torch.cat([attend(q[:, :, :start], k, v, grid, None),
                      attend(q[:, :, start:end], k[:, :, plane:], v[:, :, plane:], grid, None),
                      attend(q[:, :, end:], k, v, grid, None)], dim=2)
