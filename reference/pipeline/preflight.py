"""What a `run` will do, worked out and checked before any model loads.

Every argument is checked here with the helpers the tasks themselves use (bucketing, upstream's 4k+1
frame rounding, the sampling defaults, the schedule functions, the conditioning checks), so a bad
argument fails in a second instead of after loading, and the plan cannot disagree with the run. The
plan names the resolution after bucketing, the frames after rounding and the steps the schedule really
has, with the reason wherever they differ from what was asked, and a rough cost (see estimate.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from longcat_convert.core.errors import LongcatError
from longcat_convert.core.machine import physical_memory, resolve_device
from longcat_convert.core.text_format import human_bytes

from ..bsa import BsaParams
from ..loading import Tree, open_tree
from .buckets import REFINE_SCALE, STAGE1_SCALE, check_size, target_size
from .components import component_dir, resolve_dtype
from .estimate import (
    Call,
    Cost,
    Model,
    Rates,
    measure_rates,
    tokens_per_latent_frame,
    total_cost,
)
from .guidance import uses_cfg
from .latents import latent_frames, round_frames
from .refine import Padding, _check_conditioning
from .schedule import (
    ENHANCE_HF_START,
    ENHANCE_HF_TAIL_STEPS,
    SchedulerConfig,
    base_schedule,
    enhance_hf,
    truncate,
)
from .t2v import sampling_defaults
from .vc import _cond_latents

TASKS = ("t2v", "i2v", "vc", "refine", "long")
T2V_SIZE = (480, 832)  # upstream's t2v and long-video demos
VC_COND_FRAMES = 13
REFINE_STEPS = 50
LONG_GUIDANCE = 4.0
MEASURE_FLOPS = 1e10  # below this a run takes seconds anywhere: no probes (~0.3 s), no estimate shown
SHOW_SECONDS = 30.0  # the plan line carries an estimate from this long on
SHOW_BYTES = 2 * 1024**3  # ... or from this much memory on
REFUSE_CPU_SECONDS = 3600.0  # a CPU run estimated longer than this needs --yes
# options that only some tasks read; given to another task they are ignored, with a note
APPLIES_TO = {"num_cond_frames": ("vc", "refine", "long"), "resolution": ("i2v", "vc"),
              "num_frames": ("t2v", "i2v", "vc", "long"), "no_kv_cache": ("vc",), "no_enhance_hf": ("vc",),
              "t_thresh": ("refine",), "spatial_refine_only": ("refine", "long"), "no_bsa": ("refine", "long"),
              "segments": ("long",), "no_refine": ("long",), "refine_height": ("long",), "refine_width": ("long",),
              "negative_prompt": ("t2v", "i2v", "vc", "long"), "guidance": ("t2v", "i2v", "vc", "long"),
              "refine_steps": ("long",), "bsa_params": ("refine", "long")}
MEDIA_APPLIES_TO = {"image": ("i2v", "refine"), "video": ("vc", "refine"), "cond_video": ("refine",)}  # files
REFUSE_FIX = ("use --device cuda, or lower --height/--width, --num-frames or --steps; pass --yes to run it "
              "anyway")


@dataclass(frozen=True)
class RunRequest:
    """The `run` options, as the command line gives them (None: the task's default).

    Two have no flag; task parity sets them: `refine_steps` (long: steps per refinement window, default
    the stage-1 steps) and `bsa_params` (refine/long: block-sparse attention parameters in the DiT
    config's form, default the config's own; --no-bsa still wins).
    """

    task: str
    prompt: str = ""
    negative_prompt: str | None = None
    distill: bool = False
    num_cond_frames: int | None = None
    height: int | None = None
    width: int | None = None
    resolution: str = "480p"
    num_frames: int = 93
    steps: int | None = None
    guidance: float | None = None
    seed: int = 42
    device: str = "cpu"
    dtype: str | None = None
    max_sequence_length: int = 512
    no_kv_cache: bool = False
    no_enhance_hf: bool = False
    t_thresh: float = 0.5
    spatial_refine_only: bool = False
    no_bsa: bool = False
    segments: int = 11
    no_refine: bool = False
    refine_height: int | None = None
    refine_width: int | None = None
    refine_steps: int | None = None
    bsa_params: dict | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        return None if self.height is None else (self.height, self.width)

    @property
    def refine_size(self) -> tuple[int, int] | None:
        return None if self.refine_height is None else (self.refine_height, self.refine_width)


@dataclass(frozen=True)
class Media:
    """The inputs read from disk: `video` is vc's clip to continue or refine's stage-1 clip."""

    image: Image.Image | None = None
    video: list[Image.Image] | None = None
    cond_video: list[Image.Image] | None = None


@dataclass
class RunPlan:
    request: RunRequest
    tree: Tree
    device: torch.device
    dtype: str
    dtype_defaulted: bool
    num_frames: int  # frames per call after upstream's rounding (what the tasks are given)
    guidance: float
    calls: list[Call]
    size_text: str
    frames_text: str
    steps_text: str
    cost: Cost
    seconds: float | None = None  # None: too little work to be worth measuring
    notices: list[str] = field(default_factory=list)

    @property
    def cfg(self) -> bool:
        return uses_cfg(self.guidance)

    def line(self) -> str:
        """One line: what will actually run, and its rough cost when that is large."""
        guidance = f"guidance {self.guidance:g} ({'CFG, 2 passes per step' if self.cfg else 'no CFG'})"
        dtype = f"{self.dtype}{' (the CPU default)' if self.dtype_defaulted and self.device.type == 'cpu' else ''}"
        parts = [f"{self.request.task}: {self.size_text}", self.frames_text, self.steps_text, guidance,
                 f"{dtype} on {self.device}"]
        estimate = self.estimate_text()
        return "run " + ", ".join(parts) + (f"; estimated {estimate}" if estimate else "")

    def estimate_text(self) -> str | None:
        large_time = self.seconds is not None and self.seconds >= SHOW_SECONDS
        if not large_time and self.cost.memory_bytes < SHOW_BYTES:
            return None
        when = f"~{duration(self.seconds)} of compute, " if self.seconds is not None else ""
        return f"{when}~{human_bytes(self.cost.memory_bytes)} of memory (rough)"

    def refusal(self) -> str | None:
        """Why a CPU run is absurd (None when it is not, or it runs on a GPU)."""
        if self.device.type != "cpu":
            return None
        ram = physical_memory()
        if ram is not None and self.cost.memory_bytes > ram:
            return f"needs ~{human_bytes(self.cost.memory_bytes)} of memory, this machine has {human_bytes(ram)}"
        if self.seconds is not None and self.seconds > REFUSE_CPU_SECONDS:
            return f"would take ~{duration(self.seconds)} on this CPU"
        return None

    def to_json(self) -> dict:
        return {"size": self.size_text, "frames": self.frames_text, "steps": self.steps_text,
                "estimated_seconds": None if self.seconds is None else round(self.seconds, 1),
                "estimated_memory_bytes": self.cost.memory_bytes, "notices": list(self.notices)}


def duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


# ---- checks that need nothing but the options -------------------------------------------------------------

def check_request(request: RunRequest) -> list[str]:
    """Raise on any argument the run would refuse later; return notices about values that will be adjusted."""
    if request.task not in TASKS:
        raise LongcatError(f"unknown task {request.task!r}; choose from {', '.join(TASKS)}")
    if request.distill and request.task in ("refine", "long"):
        raise LongcatError(f"--distill applies to t2v, i2v and vc, not {request.task}")
    for name in ("height", "refine_height"):
        pair = (getattr(request, name), getattr(request, name.replace("height", "width")))
        if (pair[0] is None) != (pair[1] is None):
            flag = name.replace("_", "-")
            raise LongcatError(f"give both --{flag} and --{flag.replace('height', 'width')}, or neither")
    scale = REFINE_SCALE if request.task == "refine" else STAGE1_SCALE
    _check_pair(request.size, scale, "--height/--width")
    _check_pair(request.refine_size, REFINE_SCALE, "--refine-height/--refine-width")
    _at_least(request.steps, 1, "--steps")
    _at_least(request.refine_steps, 1, "refine_steps")
    if request.bsa_params is not None:
        BsaParams.from_config(request.bsa_params, "bsa_params")
    _at_least(request.max_sequence_length, 1, "--max-sequence-length")
    _at_least(request.segments, 0, "--segments")
    _at_least(request.num_cond_frames, 0 if request.task == "refine" else 1, "--num-cond-frames")
    if request.distill and request.steps is not None and request.steps > 50:
        raise LongcatError(f"--steps {request.steps}: distilled sampling takes at most 50 steps")
    if request.guidance is not None and not (math.isfinite(request.guidance) and request.guidance >= 0):
        raise LongcatError(f"--guidance must be a finite number >= 0, got {request.guidance}")
    if not (math.isfinite(request.t_thresh) and 0 <= request.t_thresh < 1):
        raise LongcatError(f"--t-thresh must lie in [0, 1), got {request.t_thresh}")
    if not 0 <= request.seed < 2**63:
        raise LongcatError(f"--seed must lie in [0, 2^63), got {request.seed}")
    return _ignored(request) + _frame_notices(request)


def unused_media(task: str, **paths: Path | None) -> list[str]:
    """Notices for the input files given that `task` does not read."""
    return [f"--{name.replace('_', '-')} applies to {', '.join(MEDIA_APPLIES_TO[name])}, not {task}; ignored"
            for name, path in paths.items() if path is not None and task not in MEDIA_APPLIES_TO[name]]


def read_media(task: str, image: Path | None, video: Path | None, cond_video: Path | None) -> Media:
    """The input files `task` reads, read and checked (the others are left alone)."""
    from .media import load_image, load_video

    def read(name: str, path: Path | None, load: Callable) -> Any:
        return load(path) if path is not None and task in MEDIA_APPLIES_TO[name] else None

    return Media(read("image", image, load_image), read("video", video, load_video),
                 read("cond_video", cond_video, load_video))


def cond_frames(request: RunRequest, media: Media) -> int:
    """Conditioning frames: as given, else 13 for vc and long; for refine 1 with an image, all of a
    conditioning video, none without either."""
    if request.num_cond_frames is not None:
        return request.num_cond_frames
    if request.task != "refine":
        return VC_COND_FRAMES
    return 1 if media.image is not None else (len(media.cond_video) if media.cond_video is not None else 0)


def refine_steps(request: RunRequest) -> int:
    """The steps of a refine task (its schedule, before t_thresh cuts it)."""
    return request.steps if request.steps is not None else REFINE_STEPS


def long_steps(request: RunRequest) -> tuple[int, int]:
    """Long video's steps per stage-1 call and per refinement window."""
    steps = sampling_defaults(False, request.steps, None)[0]
    return steps, request.refine_steps if request.refine_steps is not None else steps


def _ignored(request: RunRequest) -> list[str]:
    defaults = RunRequest(task=request.task)
    return [f"--{name.replace('_', '-')} applies to {', '.join(tasks)}, not {request.task}; ignored"
            for name, tasks in APPLIES_TO.items()
            if request.task not in tasks and getattr(request, name) != getattr(defaults, name)]


def _check_pair(size: tuple[int, int] | None, scale: int, flags: str) -> None:
    if size is None:
        return
    try:
        check_size(*size, scale)
    except LongcatError:
        raise LongcatError(f"{flags} must be positive multiples of {scale}, got {size[0]}x{size[1]}",
                           fix=f"e.g. {_nearest(size[0], scale)}x{_nearest(size[1], scale)}") from None


def _nearest(value: int, scale: int) -> int:
    return max(scale, round(value / scale) * scale)


def _at_least(value: int | None, minimum: int, flag: str) -> None:
    if value is not None and value < minimum:
        raise LongcatError(f"{flag} must be at least {minimum}, got {value}")


def _frame_notices(request: RunRequest) -> list[str]:
    if request.task == "refine":
        return []  # refinement takes the frames of its input video (a --num-frames is noted as ignored)
    if request.num_frames < 1:
        raise LongcatError(f"--num-frames must be at least 1, got {request.num_frames}")
    rounded = round_frames(request.num_frames)
    if rounded == request.num_frames:
        return []
    return [f"--num-frames {request.num_frames} becomes {rounded}: frame counts are 4k+1 (the first frame, "
            f"then groups of 4), and upstream rounds down"]


# ---- the plan ----------------------------------------------------------------------------------------------

def plan_run(tree_path: str | Path, request: RunRequest, media: Media, measure: bool = True) -> RunPlan:
    """Check everything, then work out the calls, their sizes and steps, and the cost. Loads no model."""
    notices = check_request(request)
    _check_media(request, media)
    device = resolve_device(request.device)
    dtype = request.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    resolve_dtype(dtype)
    tree = open_tree(tree_path)
    folders = {name: component_dir(tree, name) for name in ("tokenizer", "text_encoder", "vae", "scheduler")}
    scheduler = SchedulerConfig.from_file(folders["scheduler"] / "scheduler_config.json")
    num_frames = round_frames(request.num_frames) if request.task != "refine" else 0
    guidance = _guidance(request)
    planner = {"t2v": _t2v, "i2v": _i2v, "vc": _vc, "refine": _refine, "long": _long}[request.task]
    calls, size_text, frames_text, steps_text = planner(request, media, scheduler, num_frames, uses_cfg(guidance))
    model = Model.from_tree(tree)
    itemsize = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    cost = total_cost(model, calls, request.max_sequence_length, itemsize)
    plan = RunPlan(request, tree, device, dtype, request.dtype is None, num_frames, guidance, calls, size_text,
                   frames_text, steps_text, cost, notices=notices)
    if measure and cost.flops >= MEASURE_FLOPS:
        plan.seconds = _seconds(model, plan, cost)
    return plan


def _seconds(model: Model, plan: RunPlan, cost: Cost) -> float:
    most = max(latent_frames(c.num_frames) * tokens_per_latent_frame(model, c.height, c.width) for c in plan.calls)
    rates: Rates = measure_rates(model, resolve_dtype(plan.dtype), plan.device, most)
    return rates.seconds(cost)


def _guidance(request: RunRequest) -> float:
    if request.task == "long":
        return request.guidance if request.guidance is not None else LONG_GUIDANCE
    if request.task == "refine":
        return 1.0
    return sampling_defaults(request.distill, request.steps, request.guidance)[1]


def _check_media(request: RunRequest, media: Media) -> None:
    needs = {"i2v": ("image", media.image), "vc": ("video", media.video), "refine": ("video", media.video)}
    if request.task in needs and needs[request.task][1] is None:
        raise LongcatError(f"--task {request.task} needs --{needs[request.task][0]}")
    if media.image is not None and media.cond_video is not None:
        raise LongcatError("refine takes --image or --cond-video as conditioning, not both")


def _sized(size: tuple[int, int], given: tuple[int, int] | None, source: tuple[int, int] | None,
           resolution: str, what: str) -> str:
    text = f"{size[0]}x{size[1]} (height x width"
    if given is None and source is not None:
        text += f"; the {resolution} bucket of the {source[0]}x{source[1]} {what}, --height/--width to choose"
    elif given is None:
        text += ", the default"
    return text + ")"


def _steps_of(steps: int | None, distill: bool = False) -> tuple[int, str]:
    """The steps asked for, and ' default' when the task's default was taken."""
    return sampling_defaults(distill, steps, None)[0], ("" if steps is not None else " default")


def _t2v(request: RunRequest, media: Media, scheduler: SchedulerConfig, frames: int, cfg: bool):
    height, width = request.size or T2V_SIZE
    check_size(height, width, STAGE1_SCALE)
    steps, default = _steps_of(request.steps, request.distill)
    length = len(base_schedule(steps, request.distill, scheduler))
    call = Call("t2v", height, width, frames, length, cfg)
    return [call], _sized((height, width), request.size, None, "", ""), f"{frames} frames", f"{length}{default} steps"


def _i2v(request: RunRequest, media: Media, scheduler: SchedulerConfig, frames: int, cfg: bool):
    source = (media.image.height, media.image.width)
    height, width = target_size(source, request.size, request.resolution, STAGE1_SCALE)
    steps, default = _steps_of(request.steps, request.distill)
    length = len(base_schedule(steps, request.distill, scheduler))
    call = Call("i2v", height, width, frames, length, cfg, cond_latents=1, encoded_frames=1)
    size = _sized((height, width), request.size, source, request.resolution, "image")
    return [call], size, f"{frames} frames (the first is the image)", f"{length}{default} steps"


def _vc(request: RunRequest, media: Media, scheduler: SchedulerConfig, frames: int, cfg: bool):
    video = media.video
    source = (video[0].height, video[0].width)
    height, width = target_size(source, request.size, request.resolution, STAGE1_SCALE)
    count = cond_frames(request, media)
    cond = _cond_latents(len(video), frames, count)
    hf = not request.distill and not request.no_enhance_hf
    steps, default = _steps_of(request.steps, request.distill)
    length, steps_text = _vc_steps(steps, request.distill, hf, scheduler, default)
    call = Call("vc", height, width, frames, length, cfg, cond_latents=cond, kv_cache=not request.no_kv_cache,
                encoded_frames=count)
    size = _sized((height, width), request.size, source, request.resolution, "video")
    return [call], size, f"{frames} frames (the first {count} from the video's last frames)", steps_text


def _vc_steps(steps: int, distill: bool, hf: bool, scheduler: SchedulerConfig, default: str) -> tuple[int, str]:
    schedule = base_schedule(steps, distill, scheduler)
    if not hf:
        return len(schedule), f"{len(schedule)}{default} steps"
    length = len(enhance_hf(schedule, scheduler))
    kept = length - ENHANCE_HF_TAIL_STEPS
    return length, (f"{length} steps (enhance_hf: the {kept} of the{default} {steps} steps above "
                    f"t={ENHANCE_HF_START:g}, then {ENHANCE_HF_TAIL_STEPS} from t={ENHANCE_HF_START:g} down to 50; "
                    f"--no-enhance-hf runs exactly {steps})")


def _refine_steps(steps: int, t_thresh: float, scheduler: SchedulerConfig) -> tuple[int, str]:
    schedule = base_schedule(steps, False, scheduler)
    if not t_thresh:
        return len(schedule), f"{len(schedule)} steps"
    length = len(truncate(schedule, t_thresh, scheduler))
    return length, (f"{length} steps (t_thresh {t_thresh:g}: starts at t={t_thresh * 1000:g}, then the "
                    f"{length - 1} of {steps} steps below it)")


def _refine(request: RunRequest, media: Media, scheduler: SchedulerConfig, frames: int, cfg: bool):
    stage1 = media.video
    condition = media.cond_video
    count = cond_frames(request, media)
    _check_conditioning(media.image, condition, count)
    source = (stage1[0].height, stage1[0].width)
    height, width = target_size(source, request.size, "720p", REFINE_SCALE)
    total = len(stage1) if request.spatial_refine_only else 2 * len(stage1)
    padding = Padding.compute(total, count)
    steps = refine_steps(request)
    length, steps_text = _refine_steps(steps, request.t_thresh, scheduler)
    padded = total + padding.front + padding.back
    call = Call("refine", height, width, padded, length, False, cond_latents=padding.num_cond_latents,
                encoded_frames=padded + padding.num_cond_frames, dense_bsa=not request.no_bsa)
    size = _sized((height, width), request.size, source, "720p", "stage-1 video")
    how = "kept" if request.spatial_refine_only else "doubled"
    return [call], size, f"{total} frames (the {len(stage1)} stage-1 frames {how})", steps_text


def _long(request: RunRequest, media: Media, scheduler: SchedulerConfig, frames: int, cfg: bool):
    height, width = request.size or T2V_SIZE
    check_size(height, width, STAGE1_SCALE)
    count = cond_frames(request, media)
    if count >= frames:
        raise LongcatError(f"--num-cond-frames {count} must be below the {frames} frames of a segment")
    steps, window_steps = long_steps(request)
    calls = [Call("t2v", height, width, frames, len(base_schedule(steps, False, scheduler)), cfg)]
    vc_height, vc_width = target_size((height, width), request.size, "480p", STAGE1_SCALE)
    vc_length, _ = _vc_steps(steps, False, True, scheduler, "")
    cond = _cond_latents(frames, frames, count)
    if request.segments:
        calls.append(Call("vc", vc_height, vc_width, frames, vc_length, cfg, cond_latents=cond, kv_cache=True,
                          encoded_frames=count, repeat=request.segments))
    stage1 = frames + request.segments * (frames - count)
    steps_text = f"t2v {calls[0].steps} steps, {request.segments} continuations of {vc_length} (enhance_hf)"
    frames_text = f"{stage1} stage-1 frames ({request.segments} continuations of {frames} frames, {count} shared)"
    size_text = f"{height}x{width} (height x width)"
    if not request.no_refine:
        refine_calls, refined = _long_refine(request, (height, width), frames, count, window_steps, scheduler)
        calls += refine_calls
        steps_text += f", {request.segments + 1} refine windows of {refine_calls[0].steps}"
        frames_text += f", {refined} after refinement at {refine_calls[0].height}x{refine_calls[0].width}"
    return calls, size_text, frames_text, steps_text


def _long_refine(request: RunRequest, size: tuple[int, int], frames: int, count: int, steps: int,
                 scheduler: SchedulerConfig) -> tuple[list[Call], int]:
    """The first window (no conditioning), then `segments` windows conditioned on the previous one."""
    height, width = target_size(size, request.refine_size, "720p", REFINE_SCALE)
    factor = 1 if request.spatial_refine_only else 2
    length, _ = _refine_steps(steps, 0.5, scheduler)
    total = factor * frames
    calls, refined = [], 0
    for cond_count, repeat in ((0, 1), (factor * count, request.segments)):
        if not repeat:
            continue
        padding = Padding.compute(total, cond_count)
        padded = total + padding.front + padding.back
        calls.append(Call("refine", height, width, padded, length, False, cond_latents=padding.num_cond_latents,
                          encoded_frames=padded + padding.num_cond_frames, dense_bsa=not request.no_bsa,
                          repeat=repeat))
        refined += repeat * (total - cond_count)
    return calls, refined
