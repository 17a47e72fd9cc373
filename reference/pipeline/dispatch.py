"""The one place a planned task becomes pipeline calls: `run` writes what `run_task` returns and task parity
compares the calls it made, so the two cannot run a task differently. The plan (preflight.plan_run) has
checked the request and worked out sizes, frames and guidance; every default comes from there."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bsa import BsaParams
from .components import Pipeline
from .i2v import image_to_video
from .long import long_video
from .preflight import Media, RunPlan, RunRequest, cond_frames, long_steps, refine_steps
from .refine import refine
from .rng import RandomStreams
from .sampler import TaskResult
from .t2v import text_to_video
from .vc import video_continuation

FPS = 15  # upstream's demos write stage-1 videos at 15 fps, refined ones (2x the frames) at 30


@dataclass(frozen=True)
class TaskRun:
    results: list[TaskResult]  # every pipeline call in order (long video: t2v, continuations, refine windows)
    arrays: dict[str, np.ndarray]  # what `run` writes to its .npz
    info: dict  # the sizes and settings that shaped the output
    fps: int


def run_task(pipe: Pipeline, plan: RunPlan, media: Media, save_steps: bool = False) -> TaskRun:
    """Run the planned task on `pipe`, every draw from one generator seeded with the request's seed; the
    arrays hold frames, final latents and timesteps (with `save_steps` the state after every step too)."""
    request = plan.request
    rng = RandomStreams.from_seed(request.seed, pipe.device)
    if request.task == "long":
        return _long(pipe, plan, rng)
    if request.task == "refine":
        result = refine(pipe, media.video, rng, prompt=request.prompt, image=media.image, video=media.cond_video,
                        num_cond_frames=cond_frames(request, media), size=request.size, steps=refine_steps(request),
                        t_thresh=request.t_thresh, spatial_refine_only=request.spatial_refine_only,
                        bsa=bsa_setting(request), max_sequence_length=request.max_sequence_length)
    else:
        result = _stage1(pipe, plan, media, rng)
    arrays = {"frames": result.frames, "latents": result.latents.float().numpy(),
              "timesteps": np.asarray(result.timesteps, dtype=np.float32)}
    if save_steps:
        arrays["steps"] = np.stack([step.numpy() for step in result.steps])
    doubled = request.task == "refine" and not request.spatial_refine_only
    return TaskRun([result], arrays, result.info, 2 * FPS if doubled else FPS)


def bsa_setting(request: RunRequest) -> BsaParams | bool:
    """refine's `bsa`: off with --no-bsa, the request's parameters when it has some, else the config's."""
    if request.no_bsa:
        return False
    return BsaParams.from_config(request.bsa_params, "bsa_params") if request.bsa_params is not None else True


def _stage1(pipe: Pipeline, plan: RunPlan, media: Media, rng: RandomStreams) -> TaskResult:
    request = plan.request
    sampling = {"negative_prompt": request.negative_prompt, "num_frames": plan.num_frames, "steps": request.steps,
                "guidance": request.guidance, "distill": request.distill,
                "max_sequence_length": request.max_sequence_length}
    if request.task == "t2v":
        call = plan.calls[0]
        return text_to_video(pipe, request.prompt, rng, height=call.height, width=call.width, **sampling)
    if request.task == "i2v":
        return image_to_video(pipe, media.image, request.prompt, rng, resolution=request.resolution,
                              size=request.size, **sampling)
    return video_continuation(pipe, media.video, request.prompt, rng, resolution=request.resolution,
                              size=request.size, num_cond_frames=cond_frames(request, media),
                              use_kv_cache=not request.no_kv_cache,
                              enhance_hf_schedule=False if request.no_enhance_hf else None, **sampling)


def _long(pipe: Pipeline, plan: RunPlan, rng: RandomStreams) -> TaskRun:
    request, call = plan.request, plan.calls[0]
    steps, window_steps = long_steps(request)
    result = long_video(pipe, request.prompt, rng, negative_prompt=request.negative_prompt,
                        segments=request.segments, height=call.height, width=call.width, num_frames=plan.num_frames,
                        num_cond_frames=cond_frames(request, Media()), steps=steps, guidance=plan.guidance,
                        vc_size=request.size, refine_stage=not request.no_refine, refine_size=request.refine_size,
                        refine_steps=window_steps, spatial_refine_only=request.spatial_refine_only,
                        bsa=bsa_setting(request), max_sequence_length=request.max_sequence_length)
    frames = result.refined_frames if result.refined_frames is not None else result.stage1_frames
    arrays = {"frames": frames, "stage1_frames": result.stage1_frames}
    for index, segment in enumerate(result.segments):
        arrays[f"latents_{index:03d}_{segment.task}"] = segment.latents.float().numpy()
    info = {"height": int(frames.shape[1]), "width": int(frames.shape[2]), "num_frames": int(frames.shape[0]),
            "segments": [segment.info for segment in result.segments],
            "steps": sum(len(segment.timesteps) for segment in result.segments), "guidance": plan.guidance}
    doubled = result.refined_frames is not None and not request.spatial_refine_only
    return TaskRun(result.segments, arrays, info, 2 * FPS if doubled else FPS)
