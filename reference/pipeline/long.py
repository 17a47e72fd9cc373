"""Long video as upstream's long-video demo builds it (reference/pipeline/README.md, "Long video"):
t2v, then `segments` video continuations each conditioned on the previous segment's last frames,
then (optionally) refinement of overlapping windows, each conditioned on the previous refined window.

One `RandomStreams` runs through every call, as the demo's single generator (and the never-reseeded
global RNG of the refinement) does. Between calls frames go through the demo's uint8 round trip
(×255, truncated) and are resized to the first clip's size with PIL bicubic when sizes differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from longcat_convert.core import progress
from longcat_convert.core.errors import LongcatError

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
    results: list[TaskResult] = []
    text = {"negative_prompt": negative_prompt, "max_sequence_length": max_sequence_length}

    def ran(result: TaskResult) -> np.ndarray:
        results.append(result)
        return result.frames

    def refine_window(stage1: list[Image.Image], condition: list[Image.Image] | None, count: int) -> np.ndarray:
        return ran(refine(pipe, stage1, rng, prompt="", video=condition, num_cond_frames=count, size=refine_size,
                          steps=refine_steps, spatial_refine_only=spatial_refine_only, bsa=bsa,
                          max_sequence_length=max_sequence_length))

    stage1, refined = long_video_loop(
        lambda: ran(text_to_video(pipe, prompt, rng, height=height, width=width, num_frames=num_frames, steps=steps,
                                  guidance=guidance, **text)),
        lambda current: ran(video_continuation(pipe, current, prompt, rng, size=vc_size, num_frames=num_frames,
                                               num_cond_frames=num_cond_frames, steps=steps, guidance=guidance,
                                               use_kv_cache=True, enhance_hf_schedule=True, **text)),
        refine_window if refine_stage else None, segments=segments, num_frames=num_frames,
        num_cond_frames=num_cond_frames, spatial_refine_only=spatial_refine_only)
    return LongResult(results, stage1, refined)


def long_video_loop(t2v: Callable[[], np.ndarray], vc: Callable[[list[Image.Image]], np.ndarray],
                    refine_window: Callable[[list[Image.Image], list[Image.Image] | None, int], np.ndarray] | None, *,
                    segments: int, num_frames: int, num_cond_frames: int, spatial_refine_only: bool
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """The demo's loop, whichever pipeline makes the calls (ours, or upstream's in task parity): t2v, then
    `segments` continuations of the last clip, then refinement windows of num_frames stage-1 frames with
    stride num_frames − num_cond_frames, each conditioned on the previous refined window. The calls return
    float frames in [0, 1]; returns the stage-1 and refined frames as uint8."""
    with progress.scope("t2v"):
        current = to_pil(t2v())
    frames = list(current)
    for segment in range(segments):
        with progress.scope(f"continuation {segment + 1}/{segments}"):
            current = _resized(to_pil(vc(current)), frames[0].size)
        frames.extend(current[num_cond_frames:])
    stage1 = np.stack([np.asarray(frame) for frame in frames])
    if refine_window is None:
        return stage1, None
    condition: list[Image.Image] | None = None
    cond_count, start, refined = 0, 0, []
    for window in range(segments + 1):
        with progress.scope(f"refine window {window + 1}/{segments + 1}"):
            condition = to_pil(refine_window(frames[start:start + num_frames], condition, cond_count))
        refined.extend(condition[cond_count:])
        cond_count = num_cond_frames if spatial_refine_only else 2 * num_cond_frames
        start += num_frames - num_cond_frames
    return stage1, np.stack([np.asarray(frame) for frame in refined])


def _resized(frames: Sequence[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    """The demo resizes every continuation to the first clip's (width, height) with PIL bicubic."""
    return [frame if frame.size == size else frame.resize(size, Image.BICUBIC) for frame in frames]
