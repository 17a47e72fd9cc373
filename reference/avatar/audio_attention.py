"""Audio cross-attention (upstream `SingleStreamAttention`) and the multi-speaker 1D RoPE that steers it.

Per latent frame, that frame's video tokens (queries: q_linear of the pre-normed hidden states, per-head
RMSNorm) attend that frame's audio tokens (keys/values: kv_linear, RMSNorm on keys), softmax scale d^−½, no
mask; then `proj`. Upstream computes the attention only with flash-attn or xformers; this is the same
attention in plain PyTorch.

Multi-speaker (`ref_target_masks`, one mask per class: speaker 1, speaker 2, background, extra boxes):
* attention map [n_cls, N_noise]: noise queries against the first latent frame's keys (both after the 3D
  RoPE), heads cut into two groups of heads//2; per head softmax(q·k·d^−½) over the frame's tokens, its mass
  on each class mask divided by the mask's token count; mean over a group's heads, then over the two groups;
* query positions: speaker 1's map min-max-scaled into [0, interval], speaker 2's into
  [range − interval, range]; each token takes the position of its argmax class (classes past 2 count as 2,
  the background, at range//2, or 100 with more than 3 classes);
* key positions per frame: speaker 1's tokens at interval/2, speaker 2's at range − interval/2; with more than
  two streams, a third and later ones at the background position;
* both rotated by a 1D RoPE over the full head dim (base 10000, interleaved pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import merge_heads, project_heads, rms_norm
from ..layout import Weights
from ..rope import apply_rope, position_angles

NORMALISE_EPS = 1e-8
CROWDED_BACKGROUND = 100  # background position when there are more than 3 classes


@dataclass(frozen=True)
class SpeakerPositions:
    queries: torch.Tensor  # [N_noise] positions of the noise tokens
    keys: torch.Tensor  # [M] positions of one frame's audio tokens


def token_masks(ref_target_masks: torch.Tensor, plane: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """[n_cls, H_px, W_px] -> [n_cls, h·w] in `dtype`: nearest-resized to the token grid, then > 0."""
    resized = F.interpolate(ref_target_masks[None].float(), size=plane, mode="nearest")[0]
    return (resized > 0).flatten(1).to(dtype)


def reference_attention_map(noise_queries: torch.Tensor, first_frame_keys: torch.Tensor, masks: torch.Tensor
                            ) -> torch.Tensor:
    """[1, heads, N, d] queries, [1, heads, M, d] keys, [n_cls, M] masks -> [n_cls, N] (in the queries' dtype)."""
    heads = noise_queries.shape[1]
    group = heads // 2
    masks = masks.to(noise_queries.dtype)
    total = torch.zeros(masks.shape[0], noise_queries.shape[2], dtype=noise_queries.dtype,
                        device=noise_queries.device)
    for start in (0, group):
        q = noise_queries[0, start:start + group] * noise_queries.shape[-1] ** -0.5
        probs = (q @ first_frame_keys[0, start:start + group].to(q.dtype).transpose(-1, -2)).softmax(-1)
        per_class = [(probs * mask).sum(-1) / mask.sum() for mask in masks]  # each [group, N]
        total = total + torch.stack(per_class).mean(1)
    return total / 2


def speaker_positions(attention_map: torch.Tensor, key_tokens: int, streams: int | None, class_range: int,
                      class_interval: int) -> SpeakerPositions:
    """Query and key positions from the map [n_cls, N]; `streams` is upstream's human_num (the audio batch)."""
    classes = attention_map.shape[0]
    background = class_range // 2 if classes <= 3 else CROWDED_BACKGROUND
    speaker1 = _rescale(attention_map[0], 0, class_interval)
    speaker2 = _rescale(attention_map[1], class_range - class_interval, class_range)
    choices = torch.stack([speaker1, speaker2, torch.full_like(speaker1, background)], dim=1)
    chosen = attention_map.argmax(dim=0).clamp(max=2)
    queries = choices[torch.arange(choices.shape[0], device=choices.device), chosen]
    keys = torch.zeros(key_tokens, dtype=attention_map.dtype, device=attention_map.device)
    centre1, centre2 = class_interval / 2, (2 * class_range - class_interval) / 2
    if streams is not None and streams > 2:
        per_stream = key_tokens // streams
        keys[:per_stream], keys[per_stream:2 * per_stream], keys[2 * per_stream:] = centre1, centre2, background
    else:
        keys[:key_tokens // 2], keys[key_tokens // 2:] = centre1, centre2
    return SpeakerPositions(queries, keys)


def _rescale(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    lowest, highest = values.min(), values.max()
    return (values - lowest) / (highest - lowest + NORMALISE_EPS) * (high - low) + low


def audio_cross_attention(w: Weights, prefix: str, x: torch.Tensor, audio: torch.Tensor, frames: int, heads: int,
                          positions: SpeakerPositions | None = None) -> torch.Tensor:
    """x [B, frames·S, C] (pre-normed video tokens), audio [B·frames, M, D_a] -> [B, frames·S, C]."""
    batch, tokens, channels = x.shape
    per_frame = x.reshape(batch * frames, tokens // frames, channels)
    (q,) = project_heads(w, prefix + "audio_cross_attn.q_linear", per_frame, 1, heads)
    q = rms_norm(q, w.tensor(prefix + "audio_cross_attn.q_norm", "weight"))
    k, v = project_heads(w, prefix + "audio_cross_attn.kv_linear", audio, 2, heads)
    k = rms_norm(k, w.tensor(prefix + "audio_cross_attn.k_norm", "weight"))
    if positions is not None:
        head_dim = q.shape[-1]
        query_angles = position_angles(positions.queries, head_dim).to(q.device)
        q = apply_rope(q, query_angles.view(batch * frames, 1, tokens // frames, head_dim))
        k = apply_rope(k, position_angles(positions.keys, head_dim).to(k.device))
    out = merge_heads(F.scaled_dot_product_attention(q, k, v))
    return w.linear(prefix + "audio_cross_attn.proj", out).reshape(batch, tokens, channels)
