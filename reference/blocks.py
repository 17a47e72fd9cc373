"""One DiT block and the final layer: per-frame adaLN modulation (fp32), gated residuals, SwiGLU FFN.

Block recipe, for latent frame f with modulation chunks (shift1, scale1, gate1, shift2, scale2, gate2):
    x += gate1 · SelfAttn(LN(x)·(1+scale1)+shift1)
    x += CrossAttn(LN_affine(x), text)
    x += gate2 · SwiGLU(LN(x)·(1+scale2)+shift2)
Modulation, LayerNorms and the gated adds run in fp32; results are cast back to the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import LayerCache, cross_attention, self_attention, self_attention_cached
from .bsa import BsaParams
from .layout import Weights

Grid = tuple[int, int, int]
EPS = 1e-6


@dataclass(frozen=True)
class BlockInputs:
    """What every block of one forward call shares."""

    text: torch.Tensor | None  # [B, L, hidden]; None when cross-attention is skipped
    key_mask: torch.Tensor | None
    t_emb: torch.Tensor  # [B, T, A] fp32, one embedding per latent frame
    grid: Grid
    heads: int
    num_cond_latents: int = 0
    bsa: BsaParams | None = None


def layer_norm_fp32(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], None if weight is None else weight.float(),
                        None if bias is None else bias.float(), EPS).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int) -> torch.Tensor:
    """LN(x)·(1+scale)+shift per frame, in fp32; x [B, N, C], shift/scale [B, T, 1, C] fp32."""
    batch, tokens, channels = x.shape
    normed = layer_norm_fp32(x.float().view(batch, frames, -1, channels))
    return (normed * (scale + 1) + shift).to(x.dtype).view(batch, tokens, channels)


def gated_add(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor, frames: int) -> torch.Tensor:
    """x + gate·update per frame, added in fp32 and cast back to x's dtype."""
    batch, tokens, channels = x.shape
    gated = (gate * update.view(batch, frames, -1, channels)).view(batch, tokens, channels)
    return (x + gated).to(x.dtype)


def swiglu(w: Weights, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return w.linear(prefix + "ffn.w2", F.silu(w.linear(prefix + "ffn.w1", x)) * w.linear(prefix + "ffn.w3", x))


def adaln(w: Weights, role: str, t_emb: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    """SiLU → Linear in fp32 on each frame's embedding, split into `chunks` tensors of [B, T, 1, C]."""
    return w.linear(role, F.silu(t_emb), fp32=True).unsqueeze(2).chunk(chunks, dim=-1)


def dit_block(w: Weights, index: int, x: torch.Tensor, inputs: BlockInputs, cache: LayerCache | None = None
              ) -> tuple[torch.Tensor, LayerCache | None]:
    """Run block `index`. With `cache`, x holds only noise tokens and attends to the cached conditioning.

    Returns the new hidden states and this block's (k, v) entry (None on the cached path).
    """
    prefix = f"blocks.{index}."
    frames = inputs.grid[0]
    shift1, scale1, gate1, shift2, scale2, gate2 = adaln(w, prefix + "adaLN_modulation.1", inputs.t_emb, 6)

    attn_in = modulate(x, shift1, scale1, frames)
    if cache is None:
        attn_out, entry = self_attention(w, prefix, attn_in, inputs.grid, inputs.heads, inputs.num_cond_latents,
                                         inputs.bsa)
    else:
        attn_out, entry = self_attention_cached(w, prefix, attn_in, inputs.grid, inputs.heads, cache, inputs.bsa), None
    x = gated_add(x, gate1, attn_out, frames)
    if inputs.text is not None:
        x = text_cross_attention_step(w, prefix, x, inputs, cached=cache is not None)
    return ffn_step(w, prefix, x, (shift2, scale2, gate2), frames), entry


def text_cross_attention_step(w: Weights, prefix: str, x: torch.Tensor, inputs: BlockInputs, cached: bool
                              ) -> torch.Tensor:
    """x + CrossAttn(LN_affine(x), text); conditioning tokens (none on the cached path) get no update."""
    cond_tokens = 0 if cached else inputs.num_cond_latents * (x.shape[1] // inputs.grid[0])
    normed = layer_norm_fp32(x, w.tensor(prefix + "pre_crs_attn_norm", "weight"),
                             w.tensor(prefix + "pre_crs_attn_norm", "bias"))
    return x + cross_attention(w, prefix, normed, inputs.text, inputs.key_mask, inputs.heads, cond_tokens)


def ffn_step(w: Weights, prefix: str, x: torch.Tensor, modulation: tuple[torch.Tensor, ...], frames: int
             ) -> torch.Tensor:
    """x + gate·SwiGLU(LN(x)·(1+scale)+shift), modulation = (shift, scale, gate)."""
    shift, scale, gate = modulation
    return gated_add(x, gate, swiglu(w, prefix, modulate(x, shift, scale, frames)), frames)


def final_layer(w: Weights, x: torch.Tensor, t_emb: torch.Tensor, frames: int) -> torch.Tensor:
    """Per-frame modulation then the output Linear, both in fp32; returns fp32 [B, N, patch·C_out]."""
    shift, scale = adaln(w, "final_layer.adaLN_modulation.1", t_emb, 2)
    return w.linear("final_layer.linear", modulate(x, shift, scale, frames), fp32=True)
