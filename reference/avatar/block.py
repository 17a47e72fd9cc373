"""One avatar DiT block (upstream `LongCatAvatarSingleStreamBlock`): self-attention → text cross-attention →
audio cross-attention → FFN, with the base block's adaLN modulation, gated residuals and fp32 islands.

Audio step, over the noise frames only (conditioning frames get no update):
    (shift_a, scale_a, gate_a) = audio_adaLN_modulation(SiLU(t_frame))            fp32
    y = AudioCrossAttn(LN_affine_video(x), LN_affine_audio(tokens) or tokens)
    x += gate_a · (LN(y)·(1 + scale_a) + shift_a)                                 fp32, cast back
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import LayerCache
from ..blocks import (
    BlockInputs,
    adaln,
    ffn_step,
    gated_add,
    layer_norm_fp32,
    modulate,
    text_cross_attention_step,
)
from ..layout import Weights
from .audio_attention import (
    SpeakerPositions,
    audio_cross_attention,
    reference_attention_map,
    speaker_positions,
)
from .self_attention import (
    Reference,
    SelfAttentionResult,
    avatar_self_attention,
    avatar_self_attention_cached,
)


@dataclass(frozen=True)
class AudioInputs:
    """What every block of one call shares on the audio side."""

    tokens: torch.Tensor  # [B·T, K, D_a] one speaker per sample, or [T, B_a·K, D_a] for several speakers
    masks: torch.Tensor | None  # [n_cls, h·w] token masks (multi-speaker), else None
    streams: int | None  # upstream's human_num: the audio batch when masks are given
    prenorm: bool
    class_range: int
    class_interval: int


def avatar_block(w: Weights, index: int, x: torch.Tensor, inputs: BlockInputs, audio: AudioInputs | None,
                 reference: Reference, cache: LayerCache | None = None) -> tuple[torch.Tensor, LayerCache | None]:
    """Block `index`; `audio` None (with `inputs.text` None) skips both cross-attentions, as a cache build does."""
    prefix = f"blocks.{index}."
    frames = inputs.grid[0]
    shift1, scale1, gate1, shift2, scale2, gate2 = adaln(w, prefix + "adaLN_modulation.1", inputs.t_emb, 6)
    attn_in = modulate(x, shift1, scale1, frames)
    if cache is None:
        attn = avatar_self_attention(w, prefix, attn_in, inputs.grid, inputs.heads, inputs.num_cond_latents,
                                     reference, inputs.bsa)
    else:
        attn = avatar_self_attention_cached(w, prefix, attn_in, inputs.grid, inputs.heads, cache, reference,
                                            inputs.bsa)
    x = gated_add(x, gate1, attn.output, frames)
    if inputs.text is not None:
        x = text_cross_attention_step(w, prefix, x, inputs, cached=cache is not None)
    if audio is not None:
        x = audio_step(w, prefix, x, inputs, audio, attn, cached=cache is not None)
    return ffn_step(w, prefix, x, (shift2, scale2, gate2), frames), attn.entry


def audio_step(w: Weights, prefix: str, x: torch.Tensor, inputs: BlockInputs, audio: AudioInputs,
               attn: SelfAttentionResult, cached: bool) -> torch.Tensor:
    frames = inputs.grid[0]
    cond = 0 if cached else inputs.num_cond_latents
    noise_frames = frames - cond
    cond_tokens = cond * (x.shape[1] // frames)
    shift, scale, gate = adaln(w, prefix + "audio_adaLN_modulation.1", inputs.t_emb[:, cond:], 3)
    video = layer_norm_fp32(x, w.tensor(prefix + "pre_video_crs_attn_norm", "weight"),
                            w.tensor(prefix + "pre_video_crs_attn_norm", "bias"))
    tokens = audio.tokens
    if audio.prenorm:
        tokens = layer_norm_fp32(tokens, w.tensor(prefix + "pre_audio_crs_attn_norm", "weight"),
                                 w.tensor(prefix + "pre_audio_crs_attn_norm", "bias"))
    tokens = tokens.unflatten(0, (-1, frames))[:, cond:].flatten(0, 1)
    positions = _positions(audio, attn, tokens.shape[1], cached)
    update = audio_cross_attention(w, prefix, video[:, cond_tokens:], tokens, noise_frames, inputs.heads, positions)
    noise = gated_add(x[:, cond_tokens:], gate, modulate(update, shift, scale, noise_frames), noise_frames)
    return torch.cat([x[:, :cond_tokens], noise], dim=1)


def _positions(audio: AudioInputs, attn: SelfAttentionResult, key_tokens: int, cached: bool
               ) -> SpeakerPositions | None:
    """Speaker RoPE positions, when upstream applies them: masks given and, on an uncached call, at least two
    audio streams (with one, upstream's uncached call skips the map)."""
    if audio.masks is None or (not cached and (audio.streams or 0) < 2):
        return None
    attention_map = reference_attention_map(attn.noise_queries, attn.first_frame_keys, audio.masks)
    return speaker_positions(attention_map, key_tokens, audio.streams, audio.class_range, audio.class_interval)
