"""Image-to-video: the image's posterior sample is latent frame 0, kept clean (t = 0)
(reference/pipeline/README.md, "Image-to-video")."""

from __future__ import annotations

import torch
from PIL import Image

from .buckets import STAGE1_SCALE, target_size
from .components import DISTILL_LORA, Pipeline
from .latents import SPATIAL_FACTOR, decode, encode_sample, latent_frames, normalize, preprocess, round_frames
from .rng import RandomStreams, randn
from .sampler import TaskResult, denoise, timesteps_list
from .schedule import base_schedule
from .t2v import sampling_defaults
from .text import DEFAULT_MAX_SEQUENCE_LENGTH, text_batch


def image_to_video(pipe: Pipeline, image: Image.Image, prompt: str, rng: RandomStreams, *,
                   negative_prompt: str | None = None, resolution: str = "480p",
                   size: tuple[int, int] | None = None, num_frames: int = 93, steps: int | None = None,
                   guidance: float | None = None, distill: bool = False,
                   max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, decode_frames: bool = True) -> TaskResult:
    """generate_i2v. `size` = explicit (height, width) instead of the image's bucket (tiny models)."""
    height, width = target_size((image.height, image.width), size, resolution, STAGE1_SCALE)
    num_frames = round_frames(num_frames)
    steps, guidance = sampling_defaults(distill, steps, guidance)
    pixels = preprocess([image], height, width, pipe.dit_dtype, pipe.device)
    with pipe.adapters([DISTILL_LORA] if distill else []):
        text = text_batch(pipe, prompt, negative_prompt, guidance, max_sequence_length)
        schedule = base_schedule(steps, distill, pipe.scheduler)
        shape = (1, pipe.dit.arch.in_channels, latent_frames(num_frames), height // SPATIAL_FACTOR,
                 width // SPATIAL_FACTOR)
        # draw order as upstream: the whole clip's noise first, then the image's posterior sample
        latents = randn(shape, rng.user, torch.float32, pipe.device)
        latents[:, :, :1] = normalize(pipe, encode_sample(pipe, pixels, rng.user).to(torch.float32))
        latents, history = denoise(pipe, latents, schedule, text, guidance, num_cond=1)
    frames = decode(pipe, latents) if decode_frames else None
    info = {"height": height, "width": width, "num_frames": num_frames, "steps": len(schedule),
            "guidance": guidance, "distill": distill, "num_cond_latents": 1}
    return TaskResult("i2v", latents.cpu(), history, frames, timesteps_list(schedule), info)
