"""LongCat-Video inference tasks on the reference DiT, faithful to upstream's pipeline
(the facts relied on are restated in reference/pipeline/README.md).

    pipe = load_pipeline("weights/LongCat-Video", dtype="bfloat16", device="cuda")
    rng = RandomStreams.from_seed(42, pipe.device)
    clip = text_to_video(pipe, "a cat on a table", rng, num_frames=93)
    more = video_continuation(pipe, to_pil(clip.frames), "a cat on a table", rng)

Every task returns a `TaskResult` (final latents, the latent state after every step, decoded frames).
Batch size is 1, as upstream's guidance only works for one sample.
"""

from .buckets import bucket_size
from .components import Pipeline, load_pipeline
from .guidance import cfg_zero_star, optimized_scale
from .i2v import image_to_video
from .latents import to_pil, to_uint8
from .long import LongResult, long_video
from .refine import Padding, refine
from .rng import RandomStreams
from .sampler import TaskResult
from .schedule import (
    Schedule,
    SchedulerConfig,
    base_schedule,
    enhance_hf,
    model_timesteps,
    raw_sigmas,
    truncate,
)
from .t2v import text_to_video
from .text import clean_prompt
from .vc import video_continuation

__all__ = [
    "LongResult", "Padding", "Pipeline", "RandomStreams", "Schedule", "SchedulerConfig", "TaskResult",
    "base_schedule", "bucket_size", "cfg_zero_star", "clean_prompt", "enhance_hf", "image_to_video",
    "load_pipeline", "long_video", "model_timesteps", "optimized_scale", "raw_sigmas", "refine",
    "text_to_video", "to_pil", "to_uint8", "truncate", "video_continuation",
]
