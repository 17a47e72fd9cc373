"""Audio features -> audio tokens per latent frame (upstream `AudioProjModel` and the regrouping before it).

Input `audio_embs [B_a, F, W, S, C_a]`: for every pixel frame a window of W encoder frames, each S stacked
features of width C_a. Latent frame 0 is pixel frame 0: its whole window goes through `proj1`. Latent frame
j ≥ 1 covers pixel frames 1+(j−1)·V … j·V: the first of them contributes window entries 0..W//2, each middle
one its centre entry, the last one entries W//2..W−1 (W+V−1 entries in that order) through `proj1_vf`.
Then ReLU → proj2 → ReLU → proj3 → K tokens of width D_a → LayerNorm (eps 1e-5, in the input dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longcat_convert.core.errors import LongcatError

from ..layout import Weights
from .config import AvatarConfig

NORM_EPS = 1e-5  # audio_proj.norm is a plain nn.LayerNorm


def check_audio_embs(audio_embs: torch.Tensor, config: AvatarConfig) -> int:
    """The number of later latent frames n (F = 1 + V·n); a clear error for any other shape."""
    want = (config.audio_window, config.audio_block, config.audio_channel)
    if audio_embs.ndim != 5 or tuple(audio_embs.shape[2:]) != want:
        raise LongcatError(f"audio_embs must be [B_a, F, {want[0]}, {want[1]}, {want[2]}] (window, blocks, channels "
                           f"of the DiT config), got {list(audio_embs.shape)}")
    frames = audio_embs.shape[1]
    if frames < 1 or (frames - 1) % config.vae_scale:
        raise LongcatError(f"audio_embs has {frames} frames; it needs 1 + {config.vae_scale}·n (one per pixel frame)")
    return (frames - 1) // config.vae_scale


def later_frame_windows(audio_embs: torch.Tensor, config: AvatarConfig) -> torch.Tensor:
    """[B_a, 1+V·n, W, S, C_a] -> [B_a, n, W+V−1, S, C_a]: the feature frames each later latent frame sees."""
    groups = check_audio_embs(audio_embs, config)
    batch, _, window, blocks, channels = audio_embs.shape
    grouped = audio_embs[:, 1:].reshape(batch, groups, config.vae_scale, window, blocks, channels)
    middle = window // 2
    first = grouped[:, :, 0, : middle + 1]
    centres = grouped[:, :, 1:-1, middle]
    last = grouped[:, :, -1, middle:]
    return torch.cat([first, centres, last], dim=2)


def audio_tokens(w: Weights, audio_embs: torch.Tensor, config: AvatarConfig) -> torch.Tensor:
    """[B_a, F, W, S, C_a] (model dtype) -> [B_a, 1+n, K, D_a] tokens per latent frame."""
    batch = audio_embs.shape[0]
    first = audio_embs[:, 0].reshape(batch, 1, -1)
    later = later_frame_windows(audio_embs, config).flatten(2)
    hidden = torch.cat([F.relu(w.linear("audio_proj.proj1", first)), F.relu(w.linear("audio_proj.proj1_vf", later))],
                       dim=1)
    hidden = F.relu(w.linear("audio_proj.proj2", hidden))
    tokens = w.linear("audio_proj.proj3", hidden).unflatten(-1, (config.context_tokens, config.output_dim))
    return F.layer_norm(tokens, (config.output_dim,), w.tensor("audio_proj.norm", "weight"),
                        w.tensor("audio_proj.norm", "bias"), NORM_EPS)


def frame_tokens(tokens: torch.Tensor, frames: int, num_ref_latents: int | None) -> torch.Tensor:
    """Tokens for the call's `frames` latent frames: with a reference latent, frame 0's tokens are repeated in
    front of it; then the last `frames` frames are kept (a KV-cache call holds only the noise frames)."""
    if num_ref_latents is not None and num_ref_latents > 0:
        tokens = torch.cat([tokens[:, :1], tokens], dim=1)
    if tokens.shape[1] < frames:
        raise LongcatError(f"audio_embs covers {tokens.shape[1]} latent frames (reference included), the latents "
                           f"{frames}; give one audio window per pixel frame of the whole clip")
    return tokens[:, -frames:]


def speaker_layout(tokens: torch.Tensor, batch: int, multi_speaker: bool) -> torch.Tensor:
    """[B_a, T, K, D_a] -> what each latent frame attends: [B·T, K, D_a] for one speaker per sample, or
    [T, B_a·K, D_a] for several speakers of one sample (speaker s owns tokens s·K … (s+1)·K−1)."""
    speakers, frames = tokens.shape[:2]
    if multi_speaker:
        if batch != 1:
            raise LongcatError(f"multi-speaker (ref_target_masks given) needs a latent batch of 1, got {batch}")
        return tokens.transpose(0, 1).reshape(frames, -1, tokens.shape[-1])
    if speakers != batch:
        raise LongcatError(f"audio_embs has batch {speakers}, the latents {batch}; without ref_target_masks "
                           "each sample needs its own audio")
    return tokens.reshape(batch * frames, *tokens.shape[2:])
