"""Video continuation, with the KV cache on or off, and `enhance_hf`
(reference/pipeline/README.md, "Video continuation").

The state lives in the DiT dtype: noise is drawn in it and the conditioning latents are normalized in
it. With the KV cache the loop runs on the noise frames only (fp32 after the first step) and the cond
frames are prepended at the end; without it the full tensor stays in the DiT dtype and each step is
written back into it (rounded every step), so the two modes differ by that rounding and by the CFG
scale's element set (noise frames only vs all frames).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from longcat_convert.core.errors import LongcatError

from .buckets import STAGE1_SCALE, target_size
from .components import DISTILL_LORA, Pipeline
from .latents import (
    SPATIAL_FACTOR,
    check_rgb,
    decode,
    encode_sample,
    latent_frames,
    normalize,
    preprocess,
    round_frames,
)
from .rng import RandomStreams, randn
from .sampler import TaskResult, denoise, timesteps_list
from .schedule import base_schedule, enhance_hf
from .t2v import sampling_defaults
from .text import DEFAULT_MAX_SEQUENCE_LENGTH, text_batch


def video_continuation(pipe: Pipeline, video: Sequence[Image.Image], prompt: str, rng: RandomStreams, *,
                       negative_prompt: str | None = None, resolution: str = "480p",
                       size: tuple[int, int] | None = None, num_frames: int = 93, num_cond_frames: int = 13,
                       steps: int | None = None, guidance: float | None = None, distill: bool = False,
                       use_kv_cache: bool = True, enhance_hf_schedule: bool | None = None,
                       max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
                       decode_frames: bool = True) -> TaskResult:
    """generate_vc: continue the last `num_cond_frames` frames of `video` to `num_frames` frames in total.

    enhance_hf_schedule defaults to True, or False with `distill` (upstream forbids both together).
    `size` = explicit (height, width) instead of the bucket of the first frame (tiny models).
    """
    hf = not distill if enhance_hf_schedule is None else enhance_hf_schedule
    if distill and hf:
        raise LongcatError("distilled sampling and enhance_hf cannot be combined (upstream asserts this)")
    check_rgb(video, "video")
    height, width = target_size((video[0].height, video[0].width), size, resolution, STAGE1_SCALE)
    num_frames = round_frames(num_frames)
    num_cond = _cond_latents(len(video), num_frames, num_cond_frames)
    steps, guidance = sampling_defaults(distill, steps, guidance)
    pixels = preprocess(video, height, width, pipe.dit_dtype, pipe.device)
    dtype = pipe.dit_dtype
    with pipe.adapters([DISTILL_LORA] if distill else []):
        text = text_batch(pipe, prompt, negative_prompt, guidance, max_sequence_length)
        schedule = base_schedule(steps, distill, pipe.scheduler)
        if hf:
            schedule = enhance_hf(schedule, pipe.scheduler)
        shape = (1, pipe.dit.arch.in_channels, latent_frames(num_frames), height // SPATIAL_FACTOR,
                 width // SPATIAL_FACTOR)
        latents = randn(shape, rng.user, dtype, pipe.device)
        cond = encode_sample(pipe, pixels[:, :, -num_cond_frames:], rng.user).to(dtype)
        latents[:, :, :num_cond] = normalize(pipe, cond)
        if use_kv_cache:
            cond = latents[:, :, :num_cond]
            with torch.no_grad():
                cache = pipe.dit.build_kv_cache(cond)
            noise, history = denoise(pipe, latents[:, :, num_cond:], schedule, text, guidance, kv_cache=cache,
                                     full_state=lambda _, state: torch.cat([cond, state], dim=2))
            latents = torch.cat([cond, noise], dim=2)
        else:
            latents, history = denoise(pipe, latents, schedule, text, guidance, num_cond=num_cond)
    frames = decode(pipe, latents) if decode_frames else None
    info = {"height": height, "width": width, "num_frames": num_frames, "num_cond_frames": num_cond_frames,
            "steps": len(schedule), "guidance": guidance, "distill": distill, "use_kv_cache": use_kv_cache,
            "enhance_hf": hf, "num_cond_latents": num_cond}
    return TaskResult("vc", latents.cpu(), history, frames, timesteps_list(schedule), info)


def _cond_latents(available: int, num_frames: int, num_cond_frames: int) -> int:
    if num_cond_frames < 1:
        raise LongcatError(f"num_cond_frames must be at least 1, got {num_cond_frames}")
    if available < num_cond_frames:
        raise LongcatError(f"the video has {available} frames; {num_cond_frames} conditioning frames are needed")
    num_cond = latent_frames(num_cond_frames)
    if num_cond >= latent_frames(num_frames):
        raise LongcatError(f"{num_cond_frames} conditioning frames fill all {num_frames} output frames; "
                           f"ask for more frames")
    return num_cond
