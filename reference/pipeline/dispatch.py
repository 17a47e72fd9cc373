"""The one place a planned task becomes pipeline calls.

`run` writes what `run_task` returns and task parity compares the calls it made, so the two cannot run a
task differently; the plan (preflight.plan_run) has already checked the request and worked out the sizes,
frames and guidance, and every default comes from there.
"""

from __future__ import annotations

from collections.abc import Callable
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

FPS = 15  # upstream's demos write stage-1 videos at 15 fps, refined (2x frames) ones at 30


@dataclass(frozen=True)
class TaskRun:
    results: list[TaskResult]  # every pipeline call in order (long video: t2v, continuations, refine windows)
    frames: np.ndarray  # the output video
    info: dict  # the sizes and settings that shaped it
    fps: int
    stage1_frames: np.ndarray | None = None  # long video only

    def arrays(self, save_steps: bool = False) -> dict[str, np.ndarray]:
        """What `run` writes to its .npz: frames, final latents, timesteps (and with `save_steps` the state
        after every step); for long video its frames, the stage-1 frames and every call's final latents."""
        if self.stage1_frames is not None:
            arrays = {"frames": self.frames, "stage1_frames": self.stage1_frames}
            for index, call in enumerate(self.results):
                arrays[f"latents_{index:03d}_{call.task}"] = call.latents.float().numpy()
            return arrays
        (result,) = self.results
        arrays = {"frames": self.frames, "latents": result.latents.float().numpy(),
                  "timesteps": np.asarray(result.timesteps, dtype=np.float32)}
        if save_steps:
            arrays["steps"] = np.stack([step.numpy() for step in result.steps])
        return arrays


def run_task(pipe: Pipeline, plan: RunPlan, media: Media) -> TaskRun:
    """Run the planned task on `pipe`, every draw from one generator seeded with the request's seed."""
    rng = RandomStreams.from_seed(plan.request.seed, pipe.device)
    return RUNNERS[plan.request.task](pipe, plan, media, rng)


def bsa_setting(request: RunRequest) -> BsaParams | bool:
    """refine's `bsa`: off with --no-bsa, the request's parameters when it has some, else the config's."""
    if request.no_bsa:
        return False
    return BsaParams.from_config(request.bsa_params, "bsa_params") if request.bsa_params is not None else True


def _sampling(plan: RunPlan) -> dict:
    request = plan.request
    return {"negative_prompt": request.negative_prompt, "num_frames": plan.num_frames, "steps": request.steps,
            "guidance": request.guidance, "distill": request.distill,
            "max_sequence_length": request.max_sequence_length}


def _single(result: TaskResult, fps: int = FPS) -> TaskRun:
    return TaskRun([result], result.frames, result.info, fps)


def _t2v(pipe: Pipeline, plan: RunPlan, media: Media, rng: RandomStreams) -> TaskRun:
    call = plan.calls[0]
    return _single(text_to_video(pipe, plan.request.prompt, rng, height=call.height, width=call.width,
                                 **_sampling(plan)))


def _i2v(pipe: Pipeline, plan: RunPlan, media: Media, rng: RandomStreams) -> TaskRun:
    request = plan.request
    return _single(image_to_video(pipe, media.image, request.prompt, rng, resolution=request.resolution,
                                  size=request.size, **_sampling(plan)))


def _vc(pipe: Pipeline, plan: RunPlan, media: Media, rng: RandomStreams) -> TaskRun:
    request = plan.request
    return _single(video_continuation(pipe, media.video, request.prompt, rng, resolution=request.resolution,
                                      size=request.size, num_cond_frames=cond_frames(request, media),
                                      use_kv_cache=not request.no_kv_cache,
                                      enhance_hf_schedule=False if request.no_enhance_hf else None,
                                      **_sampling(plan)))


def _refine(pipe: Pipeline, plan: RunPlan, media: Media, rng: RandomStreams) -> TaskRun:
    request = plan.request
    result = refine(pipe, media.video, rng, prompt=request.prompt, image=media.image, video=media.cond_video,
                    num_cond_frames=cond_frames(request, media), size=request.size, steps=refine_steps(request),
                    t_thresh=request.t_thresh, spatial_refine_only=request.spatial_refine_only,
                    bsa=bsa_setting(request), max_sequence_length=request.max_sequence_length)
    return _single(result, FPS if request.spatial_refine_only else 2 * FPS)


def _long(pipe: Pipeline, plan: RunPlan, media: Media, rng: RandomStreams) -> TaskRun:
    request, call = plan.request, plan.calls[0]
    steps, window_steps = long_steps(request)
    result = long_video(pipe, request.prompt, rng, negative_prompt=request.negative_prompt,
                        segments=request.segments, height=call.height, width=call.width, num_frames=plan.num_frames,
                        num_cond_frames=cond_frames(request, media), steps=steps, guidance=plan.guidance,
                        vc_size=request.size, refine_stage=not request.no_refine, refine_size=request.refine_size,
                        refine_steps=window_steps, spatial_refine_only=request.spatial_refine_only,
                        bsa=bsa_setting(request), max_sequence_length=request.max_sequence_length)
    frames = result.refined_frames if result.refined_frames is not None else result.stage1_frames
    info = {"height": int(frames.shape[1]), "width": int(frames.shape[2]), "num_frames": int(frames.shape[0]),
            "segments": [segment.info for segment in result.segments],
            "steps": sum(len(segment.timesteps) for segment in result.segments), "guidance": plan.guidance}
    doubled = result.refined_frames is not None and not request.spatial_refine_only
    return TaskRun(result.segments, frames, info, 2 * FPS if doubled else FPS, result.stage1_frames)


RUNNERS: dict[str, Callable[[Pipeline, RunPlan, Media, RandomStreams], TaskRun]] = {
    "t2v": _t2v, "i2v": _i2v, "vc": _vc, "refine": _refine, "long": _long}
