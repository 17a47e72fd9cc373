"""Text-to-video, normal and distilled
(reference/pipeline/README.md, "Text-to-video and the distilled mode")."""

from __future__ import annotations

import torch

from .buckets import STAGE1_SCALE, check_size
from .components import DISTILL_LORA, Pipeline
from .latents import SPATIAL_FACTOR, decode, latent_frames, round_frames
from .rng import RandomStreams, randn
from .sampler import TaskResult, denoise, timesteps_list
from .schedule import base_schedule
from .text import DEFAULT_MAX_SEQUENCE_LENGTH, text_batch


def sampling_defaults(distill: bool, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """The demos' settings: 50 steps at guidance 4, or 16 distilled steps at guidance 1 (no CFG)."""
    return (steps if steps is not None else (16 if distill else 50),
            guidance if guidance is not None else (1.0 if distill else 4.0))


def text_to_video(pipe: Pipeline, prompt: str, rng: RandomStreams, *, negative_prompt: str | None = None,
                  height: int = 480, width: int = 832, num_frames: int = 93, steps: int | None = None,
                  guidance: float | None = None, distill: bool = False,
                  max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, decode_frames: bool = True) -> TaskResult:
    """generate_t2v: height/width verbatim (multiples of 16); `distill` enables cfg_step_lora for the call."""
    check_size(height, width, STAGE1_SCALE)
    num_frames = round_frames(num_frames)
    steps, guidance = sampling_defaults(distill, steps, guidance)
    with pipe.adapters([DISTILL_LORA] if distill else []):
        text = text_batch(pipe, prompt, negative_prompt, guidance, max_sequence_length)
        schedule = base_schedule(steps, distill, pipe.scheduler)
        shape = (1, pipe.dit.arch.in_channels, latent_frames(num_frames), height // SPATIAL_FACTOR,
                 width // SPATIAL_FACTOR)
        latents = randn(shape, rng.user, torch.float32, pipe.device)
        latents, history = denoise(pipe, latents, schedule, text, guidance)
    frames = decode(pipe, latents) if decode_frames else None
    info = {"height": height, "width": width, "num_frames": num_frames, "steps": len(schedule),
            "guidance": guidance, "distill": distill, "num_cond_latents": 0}
    return TaskResult("t2v", latents.cpu(), history, frames, timesteps_list(schedule), info)
