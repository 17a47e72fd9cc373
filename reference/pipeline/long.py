"""Long video as upstream's long-video demo builds it (pipeline.md §6): t2v, then `segments` video
continuations each conditioned on the previous segment's last frames, then (optionally) refinement of
overlapping windows, each conditioned on the previous refined window.

One `RandomStreams` runs through every call, as the demo's single generator (and the never-reseeded
global RNG of the refinement) does. Between calls frames go through the demo's uint8 round trip
(×255, truncated) and are resized to the first clip's size with PIL bicubic when sizes differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from longcat_convert import progress
from longcat_convert.errors import LongcatError

from ..bsa import BsaParams
from .components import Pipeline
from .latents import to_pil
from .refine import refine
from .rng import RandomStreams
from .sampler import TaskResult
from .t2v import text_to_video
from .text import DEFAULT_MAX_SEQUENCE_LENGTH
from .vc import video_continuation


@dataclass
class LongResult:
    segments: list[TaskResult]  # t2v, the continuations, then the refinement windows
    stage1_frames: np.ndarray  # uint8 [93 + 80·segments, H, W, 3] with the demo's defaults
    refined_frames: np.ndarray | None  # uint8, 2× the frames (1× if spatial_refine_only)


def long_video(pipe: Pipeline, prompt: str, rng: RandomStreams, *, negative_prompt: str | None = None,
               segments: int = 11, height: int = 480, width: int = 832, num_frames: int = 93,
               num_cond_frames: int = 13, steps: int = 50, guidance: float = 4.0,
               vc_size: tuple[int, int] | None = None, refine_stage: bool = True,
               refine_size: tuple[int, int] | None = None, refine_steps: int = 50, spatial_refine_only: bool = False,
               bsa: BsaParams | bool = True, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> LongResult:
    """run_demo_long_video with `segments` continuations (the demo uses 11).

    vc_size / refine_size: explicit (height, width) for the continuations / the refinement instead of
    the 480p and 720p buckets (tiny models).
    """
    if segments < 0:
        raise LongcatError(f"segments must not be negative, got {segments}")
    if num_cond_frames >= num_frames:
        raise LongcatError(f"num_cond_frames {num_cond_frames} must be below num_frames {num_frames}")
    with progress.scope("t2v"):
        first = text_to_video(pipe, prompt, rng, negative_prompt=negative_prompt, height=height, width=width,
                              num_frames=num_frames, steps=steps, guidance=guidance,
                              max_sequence_length=max_sequence_length)
    results = [first]
    current = to_pil(first.frames)
    frames = list(current)
    for segment in range(segments):
        with progress.scope(f"continuation {segment + 1}/{segments}"):
            result = video_continuation(pipe, current, prompt, rng, negative_prompt=negative_prompt, size=vc_size,
                                        num_frames=num_frames, num_cond_frames=num_cond_frames, steps=steps,
                                        guidance=guidance, use_kv_cache=True, enhance_hf_schedule=True,
                                        max_sequence_length=max_sequence_length)
        results.append(result)
        current = _resized(to_pil(result.frames), frames[0].size)
        frames.extend(current[num_cond_frames:])
    stage1 = np.stack([np.asarray(frame) for frame in frames])
    refined = None
    if refine_stage:
        refined = _refine_windows(pipe, frames, rng, results, segments=segments, num_frames=num_frames,
                                  num_cond_frames=num_cond_frames, size=refine_size, steps=refine_steps,
                                  spatial_refine_only=spatial_refine_only, bsa=bsa,
                                  max_sequence_length=max_sequence_length)
    return LongResult(results, stage1, refined)


def _refine_windows(pipe: Pipeline, frames: list[Image.Image], rng: RandomStreams, results: list[TaskResult], *,
                    segments: int, num_frames: int, num_cond_frames: int, size: tuple[int, int] | None, steps: int,
                    spatial_refine_only: bool, bsa: BsaParams | bool, max_sequence_length: int) -> np.ndarray:
    """Refine windows of num_frames stage-1 frames, stride num_frames − num_cond_frames, prompt ''."""
    condition: list[Image.Image] | None = None
    cond_count, start, refined = 0, 0, []
    for window in range(segments + 1):
        with progress.scope(f"refine window {window + 1}/{segments + 1}"):
            result = refine(pipe, frames[start:start + num_frames], rng, prompt="", video=condition,
                            num_cond_frames=cond_count, size=size, steps=steps,
                            spatial_refine_only=spatial_refine_only, bsa=bsa, max_sequence_length=max_sequence_length)
        results.append(result)
        window = to_pil(result.frames)
        refined.extend(window[cond_count:])
        condition = window
        cond_count = num_cond_frames if spatial_refine_only else 2 * num_cond_frames
        start += num_frames - num_cond_frames
    return np.stack([np.asarray(frame) for frame in refined])


def _resized(frames: Sequence[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    """The demo resizes every continuation to the first clip's (width, height) with PIL bicubic."""
    return [frame if frame.size == size else frame.resize(size, Image.BICUBIC) for frame in frames]
