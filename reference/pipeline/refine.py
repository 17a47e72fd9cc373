"""480p -> 720p refinement (reference/pipeline/README.md, "Refinement (480p to 720p)"):
refinement LoRA, block-sparse attention, `t_thresh` start.

Geometry: the stage-1 frames are stretched to the 720p/64 bucket (bilinear, align_corners) and, unless
`spatial_refine_only`, resampled to 2N frames (trilinear, align_corners), all in the DiT dtype; then the
conditioning and noise parts are padded to multiples of 4 latents (first frame repeated in front, last
frame at the back). The start latent is 0.5·enc(upsampled) + 0.5·ε with both the posterior sample and ε
drawn from the *default* stream (upstream: the global RNG); conditioning latents come from the user
generator and stay clean. The output is sliced back to the N' requested frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from longcat_convert.core.errors import LongcatError

from ..bsa import BsaParams
from .buckets import REFINE_SCALE, target_size
from .components import REFINE_LORA, Pipeline
from .latents import TEMPORAL_FACTOR, check_rgb, decode, encode_sample, normalize, preprocess
from .rng import RandomStreams, randn
from .sampler import TaskResult, denoise, timesteps_list
from .schedule import base_schedule, truncate
from .text import DEFAULT_MAX_SEQUENCE_LENGTH, text_batch

BSA_GRANULARITY = 4  # latent frames per block-sparse-attention chunk


@dataclass(frozen=True)
class Padding:
    """How refinement pads the upsampled clip (all counts in pixel frames unless named latents)."""

    num_cond_latents: int
    front: int  # copies of the first frame put in front (and in front of the conditioning)
    back: int  # copies of the last frame appended
    num_cond_frames: int  # conditioning frames after the front padding

    @classmethod
    def compute(cls, total_frames: int, num_cond_frames: int) -> Padding:
        noise_frames = total_frames - num_cond_frames
        cond_latents, front = 0, 0
        if num_cond_frames > 0:
            cond_latents = 1 + math.ceil((num_cond_frames - 1) / TEMPORAL_FACTOR)
            cond_latents = math.ceil(cond_latents / BSA_GRANULARITY) * BSA_GRANULARITY
            front = 1 + (cond_latents - 1) * TEMPORAL_FACTOR - num_cond_frames
        noise_latents = math.ceil(math.ceil(noise_frames / TEMPORAL_FACTOR) / BSA_GRANULARITY) * BSA_GRANULARITY
        back = noise_latents * TEMPORAL_FACTOR - noise_frames
        return cls(cond_latents, front, back, num_cond_frames + front)


def upsample(pipe: Pipeline, stage1: Sequence[Image.Image], height: int, width: int, frames: int) -> torch.Tensor:
    """uint8 frames -> [1, 3, frames, H, W] in [−1, 1], in the DiT dtype like upstream."""
    video = torch.from_numpy(np.stack([np.asarray(frame) for frame in stage1])).permute(0, 3, 1, 2)
    video = video.to(device=pipe.device, dtype=pipe.dit_dtype)
    video = F.interpolate(video, size=(height, width), mode="bilinear", align_corners=True)
    video = video.permute(1, 0, 2, 3).unsqueeze(0) / 255.0
    video = F.interpolate(video, size=(frames, height, width), mode="trilinear", align_corners=True)
    return video * 2 - 1


def pad(video: torch.Tensor, padding: Padding) -> torch.Tensor:
    front = video[:, :, :1].repeat(1, 1, padding.front, 1, 1)
    back = video[:, :, -1:].repeat(1, 1, padding.back, 1, 1)
    return torch.cat([front, video, back], dim=2)


def refine(pipe: Pipeline, stage1: Sequence[Image.Image] | np.ndarray, rng: RandomStreams, *, prompt: str = "",
           image: Image.Image | None = None, video: Sequence[Image.Image] | None = None, num_cond_frames: int = 0,
           size: tuple[int, int] | None = None, steps: int = 50, t_thresh: float = 0.5,
           spatial_refine_only: bool = False, bsa: BsaParams | bool = True, use_lora: bool = True,
           max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, decode_frames: bool = True) -> TaskResult:
    """generate_refine with the demos' setup (refinement_lora on, BSA on; `bsa=True` = the config's params).

    stage1: the stage-1 frames as RGB PIL images or a uint8 [N, H, W, 3] array. Conditioning: `image`
    (num_cond_frames must be 1) or `video` (its last num_cond_frames frames). `size` = explicit
    (height, width) instead of the 720p bucket of the first stage-1 frame.
    """
    stage1 = _frames(stage1)
    _check_conditioning(image, video, num_cond_frames)
    if not 0 <= t_thresh < 1:
        raise LongcatError(f"t_thresh must lie in [0, 1), got {t_thresh}")
    height, width = target_size((stage1[0].height, stage1[0].width), size, "720p", REFINE_SCALE)
    total = len(stage1) if spatial_refine_only else 2 * len(stage1)
    padding = Padding.compute(total, num_cond_frames)
    with pipe.adapters([REFINE_LORA] if use_lora else [], _bsa_params(pipe, bsa)):
        text = text_batch(pipe, prompt, None, 1.0, max_sequence_length)
        schedule = base_schedule(steps, False, pipe.scheduler)
        if t_thresh:
            schedule = truncate(schedule, t_thresh, pipe.scheduler)
        upsampled = pad(upsample(pipe, stage1, height, width, total), padding)
        start = normalize(pipe, encode_sample(pipe, upsampled, rng.default))
        noise = randn(tuple(start.shape), rng.default, start.dtype, pipe.device)
        latents = ((1 - t_thresh) * start + t_thresh * noise).contiguous().to(torch.float32)
        if padding.num_cond_latents:
            cond = _cond_pixels(pipe, image, video, num_cond_frames, padding, height, width)
            cond = normalize(pipe, encode_sample(pipe, cond, rng.user).to(torch.float32))
            latents[:, :, :padding.num_cond_latents] = cond
        latents, history = denoise(pipe, latents, schedule, text, 1.0, num_cond=padding.num_cond_latents)
    frames = decode(pipe, latents)[padding.front:padding.front + total] if decode_frames else None
    info = {"height": height, "width": width, "num_frames": total, "steps": len(schedule), "t_thresh": t_thresh,
            "spatial_refine_only": spatial_refine_only, "num_cond_latents": padding.num_cond_latents,
            "pad_front": padding.front, "pad_back": padding.back, "bsa": _bsa_note(pipe, bsa)}
    return TaskResult("refine", latents.cpu(), history, frames, timesteps_list(schedule), info)


def _frames(stage1: Sequence[Image.Image] | np.ndarray) -> list[Image.Image]:
    if isinstance(stage1, np.ndarray):
        if stage1.dtype != np.uint8 or stage1.ndim != 4 or stage1.shape[-1] != 3:
            raise LongcatError(f"stage-1 frames must be uint8 [N, H, W, 3], got {stage1.dtype} {list(stage1.shape)}")
        stage1 = [Image.fromarray(frame) for frame in stage1]
    stage1 = list(stage1)
    check_rgb(stage1, "stage-1 video")
    return stage1


def _check_conditioning(image: Image.Image | None, video: Sequence[Image.Image] | None, num_cond_frames: int) -> None:
    if image is not None and video is not None:
        raise LongcatError("refinement takes an image or a video as conditioning, not both")
    if num_cond_frames < 0:
        raise LongcatError(f"num_cond_frames must not be negative, got {num_cond_frames}")
    if (image is not None or video is not None) != (num_cond_frames > 0):
        raise LongcatError("conditioning needs num_cond_frames > 0 and num_cond_frames > 0 needs an image or a "
                           "video")
    if image is not None and num_cond_frames != 1:
        raise LongcatError(f"an image conditions exactly 1 frame, got num_cond_frames={num_cond_frames}")
    if video is not None and len(video) < num_cond_frames:
        raise LongcatError(f"the conditioning video has {len(video)} frames; {num_cond_frames} are needed")


def _cond_pixels(pipe: Pipeline, image: Image.Image | None, video: Sequence[Image.Image] | None,
                 num_cond_frames: int, padding: Padding, height: int, width: int) -> torch.Tensor:
    """The conditioning clip as encoded: the last num_cond_frames frames (or the image), first frame repeated
    `padding.front` times in front."""
    if image is not None:
        pixels = preprocess([image], height, width, pipe.dit_dtype, pipe.device)
    else:
        pixels = preprocess(list(video), height, width, pipe.dit_dtype, pipe.device)[:, :, -num_cond_frames:]
    pixels = torch.cat([pixels[:, :, :1].repeat(1, 1, padding.front, 1, 1), pixels], dim=2)
    if pixels.shape[2] != padding.num_cond_frames:
        raise LongcatError(f"internal: {pixels.shape[2]} conditioning frames, expected {padding.num_cond_frames}")
    return pixels


def _bsa_params(pipe: Pipeline, bsa: BsaParams | bool) -> BsaParams | None:
    if bsa is True:
        return pipe.dit.arch.bsa_params or BsaParams()
    return bsa or None


def _bsa_note(pipe: Pipeline, bsa: BsaParams | bool) -> dict | None:
    params = _bsa_params(pipe, bsa)
    if params is None:
        return None
    return {"sparsity": params.sparsity, "cdf_threshold": params.cdf_threshold, "chunk_q": list(params.chunk_q),
            "chunk_k": list(params.chunk_k)}
