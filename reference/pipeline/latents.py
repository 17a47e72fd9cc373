"""Pixels <-> normalized latents
(reference/pipeline/README.md, "Pixels, the VAE and latent normalization").

* preprocessing: PIL Lanczos stretch to (width, height) (no crop, `reducing_gap=None`), /255, 2x−1,
  frames stacked as [1, 3, T, H, W];
* VAE encode always *samples* the posterior: mean + std·ε, ε drawn in the VAE dtype from the given
  generator (upstream passes the user generator, or none = the global RNG in refinement);
* normalization as upstream writes it: μ and σ are cast to the latents' dtype first and the
  reciprocal 1/σ is taken in that dtype; z_n = (z − μ)·(1/σ), z = z_n / (1/σ) + μ;
* decode: cast to the VAE dtype, then denormalize, decode (clamped to [−1, 1]), then x·0.5 + 0.5 clamped
  to [0, 1] in the VAE dtype, frames-first, as float32 numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from longcat_convert.core import progress
from longcat_convert.core.errors import LongcatError

from .components import Pipeline
from .rng import randn

TEMPORAL_FACTOR = 4
SPATIAL_FACTOR = 8


def latent_frames(num_frames: int) -> int:
    """Latent frames for `num_frames` pixel frames: frame 0 alone, then groups of 4 (leftovers dropped)."""
    return 1 + (num_frames - 1) // TEMPORAL_FACTOR


def round_frames(num_frames: int) -> int:
    """Upstream's rounding of a frame count to 4k+1: down, not to the nearest; at least 1."""
    if num_frames % TEMPORAL_FACTOR != 1:
        num_frames = num_frames // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1
    return max(num_frames, 1)


# ---- pixels ------------------------------------------------------------------------------------------

def check_rgb(frames: Sequence[Image.Image], what: str) -> None:
    if not frames:
        raise LongcatError(f"the {what} has no frames")
    for frame in frames:
        if not isinstance(frame, Image.Image):
            raise LongcatError(f"the {what} must be PIL images (upstream rejects tensors and arrays), got "
                               f"{type(frame).__name__}")
        if frame.mode != "RGB":
            raise LongcatError(f"the {what} must be RGB, got PIL mode {frame.mode}")


def preprocess(frames: Sequence[Image.Image], height: int, width: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """PIL frames -> [1, 3, T, H, W] in [−1, 1], cast to `dtype` (the DiT's, as upstream) on `device`."""
    check_rgb(frames, "conditioning")
    arrays = [np.asarray(frame.resize((width, height), resample=Image.LANCZOS, reducing_gap=None),
                         dtype=np.float32) / 255.0 for frame in frames]
    pixels = torch.from_numpy(np.stack(arrays)).permute(3, 0, 1, 2)[None]
    return (2.0 * pixels - 1.0).to(device=device, dtype=dtype)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """The demos' float [0, 1] -> uint8 conversion: ×255 and truncate."""
    return (np.asarray(frames) * 255).astype(np.uint8)


def to_pil(frames: np.ndarray) -> list[Image.Image]:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = to_uint8(frames)
    return [Image.fromarray(frame) for frame in frames]


# ---- normalization -----------------------------------------------------------------------------------

def _statistics(pipe: Pipeline, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    config = pipe.vae.config
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape).to(like.device, like.dtype)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, inverse_std


def normalize(pipe: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    mean, inverse_std = _statistics(pipe, latents)
    return (latents - mean) * inverse_std


def denormalize(pipe: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    mean, inverse_std = _statistics(pipe, latents)
    return latents / inverse_std + mean


# ---- VAE ---------------------------------------------------------------------------------------------

def encode_sample(pipe: Pipeline, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[1, 3, T, H, W] -> posterior sample [1, z, 1+⌊(T−1)/4⌋, H/8, W/8] in the VAE dtype (not normalized)."""
    with torch.no_grad(), progress.stage("VAE encode"):
        posterior = pipe.vae.encode(pixels.to(pipe.device, pipe.vae_dtype)).latent_dist
    noise = randn(tuple(posterior.mean.shape), generator, posterior.parameters.dtype, pipe.device)
    return posterior.mean + posterior.std * noise


def decode(pipe: Pipeline, latents: torch.Tensor) -> np.ndarray:
    """Normalized latents [1, z, T_lat, h, w] -> float32 frames [T, H, W, 3] in [0, 1]."""
    latents = denormalize(pipe, latents.to(pipe.device, pipe.vae_dtype))
    with torch.no_grad(), progress.stage("VAE decode"):
        video = pipe.vae.decode(latents, return_dict=False)[0]
    frames = (video[0] * 0.5 + 0.5).clamp(0, 1)
    return frames.permute(1, 2, 3, 0).float().cpu().numpy()
