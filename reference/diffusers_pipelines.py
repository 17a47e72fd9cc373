"""diffusers pipelines for LongCat-Video: `DiffusionPipeline` subclasses over the reference runner's tasks.

    pipe = LongCatVideoPipeline.from_pretrained("weights/longcat-diffusers", torch_dtype=torch.bfloat16)
    video = pipe("a cat on a table", generator=torch.Generator().manual_seed(0)).frames[0]

One class per task, as diffusers ships the Wan family: `LongCatVideoPipeline` (text-to-video, normal or
`distill=True`; long video as its `long_video` method), `LongCatVideoImageToVideoPipeline`,
`LongCatVideoVideoContinuationPipeline` (KV cache on or off) and `LongCatVideoRefinePipeline` (480p → 720p).
All four load the same diffusers-layout tree; `from_pipe` moves the components between them without copies.

The denoising is the runner's (`longcat_reference.pipeline`: `text_to_video`, `image_to_video`,
`video_continuation`, `refine`, `long_video`), called on a view of the pipeline's components, so a call
computes exactly what `longcat-convert run` computes on the same tree with the same seed. What a pipeline
adds: diffusers' loading and saving, `callback_on_step_end`, the progress bar, output types, and LoRAs:
the tree's `lora/*.safetensors` (upstream format) are registered by name when the pipeline is loaded from a
local folder; `load_longcat_lora(path, name)` registers another file. Upstream applies these adapters at run
time with fp32 islands and per-block up projections, which diffusers' peft-based `load_lora_weights` cannot
express exactly, so tasks enable the adapter they need for the call (`cfg_step_lora` with `distill=True`,
`refinement_lora` in refinement) as upstream's demos do.

Random numbers: `generator` is the demos' generator (a `torch.Generator` on the pipeline's device type).
Refinement also draws from torch's global RNG upstream; here that stream is a generator seeded with
`generator.initial_seed()`, which equals `run --seed` when the generator was freshly seeded. Without a
generator the seed is drawn from torch's global RNG (so `torch.manual_seed` makes a call reproducible).
"""

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from transformers import AutoTokenizer, UMT5EncoderModel

from longcat_convert.core.errors import LongcatError

from .bsa import BsaParams
from .diffusers_model import LongCatVideoTransformer3DModel
from .loading import LoraFile
from .lora_layers import read_adapter, read_upstream_lora
from .pipeline.components import DISTILL_LORA, REFINE_LORA, Pipeline
from .pipeline.i2v import image_to_video
from .pipeline.latents import to_pil
from .pipeline.long import long_video
from .pipeline.refine import refine
from .pipeline.rng import RandomStreams
from .pipeline.sampler import TaskResult
from .pipeline.schedule import SchedulerConfig
from .pipeline.t2v import text_to_video
from .pipeline.text import DEFAULT_MAX_SEQUENCE_LENGTH
from .pipeline.vc import video_continuation

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
LORA_DIR = "lora"
SEED_RANGE = 2**63 - 1


@dataclass
class LongCatVideoPipelineOutput(BaseOutput):
    """frames: [1, T, H, W, 3] float32 in [0, 1] ("np"), [1, T, 3, H, W] ("pt"), a list holding one list of PIL
    images ("pil"), or the final normalized latents [1, 16, T_lat, h, w] ("latent")."""

    frames: Any


@dataclass
class LongCatVideoLongOutput(BaseOutput):
    """frames: the refined video (or the stage-1 video without refinement) as uint8 [T, H, W, 3];
    stage1_frames: the t2v clip and its continuations, uint8."""

    frames: np.ndarray
    stage1_frames: np.ndarray


class _LongCatVideoBase(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, tokenizer: AutoTokenizer, text_encoder: UMT5EncoderModel, vae: AutoencoderKLWan,
                 scheduler: FlowMatchEulerDiscreteScheduler, transformer: LongCatVideoTransformer3DModel):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                              transformer=transformer)
        self._lora_paths: dict[str, Path] = {}
        self._lora_files: dict[str, LoraFile] = {}

    # ---- loading, saving, LoRAs ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader; a local tree's `lora/*.safetensors` are registered by name (file stem)."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path) / LORA_DIR
        if folder.is_dir():
            for path in sorted(folder.glob("*.safetensors")):
                pipe.load_longcat_lora(path, path.stem)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """Another LongCat-Video task on the same components, with the same registered LoRAs."""
        pipe = super().from_pipe(pipeline, **kwargs)
        pipe._lora_paths = dict(getattr(pipeline, "_lora_paths", {}))
        pipe._lora_files = dict(getattr(pipeline, "_lora_files", {}))
        return pipe

    def load_longcat_lora(self, path: str | Path, adapter_name: str | None = None) -> None:
        """Register an upstream-format LoRA file (`lora/<name>.safetensors` of the raw or diffusers layout) under
        `adapter_name` (default: the file stem). The tasks use `cfg_step_lora` (distill) and `refinement_lora`.
        The file is checked now and read when a task first needs it."""
        path = Path(path)
        if not path.is_file():
            raise LongcatError("LoRA file does not exist", path)
        read_adapter(path, "upstream")  # header only: the grammar validate checks
        name = adapter_name or path.stem
        self._lora_paths[name] = path
        self._lora_files.pop(name, None)

    @property
    def lora_names(self) -> list[str]:
        return sorted(self._lora_paths)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """diffusers' writer, plus the registered LoRAs as `lora/<name>.safetensors` (the layout's place)."""
        super().save_pretrained(save_directory, **kwargs)
        if self._lora_paths:
            folder = Path(save_directory) / LORA_DIR
            folder.mkdir(exist_ok=True)
            for name, path in sorted(self._lora_paths.items()):
                target = folder / f"{name}.safetensors"
                if not (target.exists() and target.samefile(path)):  # saving over the tree it came from
                    shutil.copyfile(path, target)

    def _lora(self, name: str) -> LoraFile:
        if name not in self._lora_files:
            if name not in self._lora_paths:
                raise LongcatError(f"no LoRA named {name!r} is registered; registered: "
                                   f"{', '.join(self.lora_names) or 'none'}",
                                   fix=f"pipe.load_longcat_lora(path, {name!r})")
            path = self._lora_paths[name]
            self._lora_files[name] = LoraFile(name, path, "upstream", read_upstream_lora(path))
        return self._lora_files[name]

    # ---- one call ------------------------------------------------------------------------------------

    def _runner(self, loras: Sequence[str], callback, tensor_inputs: list[str]) -> Pipeline:
        """The runner's view of these components for one call; step_end drives the progress bar and callback."""
        if not isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            raise LongcatError(f"the LongCat-Video pipelines sample with upstream's flow-matching Euler schedule, "
                               f"not {type(self.scheduler).__name__}",
                               fix="keep the FlowMatchEulerDiscreteScheduler of the tree's scheduler/ folder")
        scheduler = SchedulerConfig.from_dict(dict(self.scheduler.config), "scheduler config")
        view = Pipeline(None, self.transformer, self.tokenizer, self.text_encoder, self.vae, scheduler,
                        self._execution_device, {name: self._lora(name) for name in loras})
        bar: list = []

        def step_end(index: int, count: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor | None:
            if index == 0:
                bar[:] = [self.progress_bar(total=count)]
            replaced = None
            if callback is not None:
                outputs = callback(self, index, t, {name: latents for name in tensor_inputs}) or {}
                replaced = outputs.get("latents")
            bar[0].update()
            if index == count - 1:
                bar[0].close()
            return replaced

        view.step_end = step_end
        return view

    def _run(self, task: Callable[[Pipeline, RandomStreams], TaskResult], loras: Sequence[str], generator,
             output_type: str, return_dict: bool, callback, tensor_inputs: list[str]):
        _check_output_type(output_type)
        callback, tensor_inputs = _callback(callback, tensor_inputs, self._callback_tensor_inputs)
        rng = _streams(generator, self._execution_device)
        result = task(self._runner(loras, callback, tensor_inputs), rng)
        self.maybe_free_model_hooks()
        frames = _output(result, output_type)
        return LongCatVideoPipelineOutput(frames=frames) if return_dict else (frames,)


class LongCatVideoPipeline(_LongCatVideoBase):
    """Text-to-video (upstream's generate_t2v); `distill=True` runs the cfg_step LoRA's 16-step distilled mode."""

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] = None, negative_prompt: str | list[str] | None = None,
                 height: int = 480, width: int = 832, num_frames: int = 93, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, distill: bool = False,
                 generator: torch.Generator | None = None, output_type: str = "np", return_dict: bool = True,
                 callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None,
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH):
        """Defaults as upstream's demos: 50 steps at guidance 4, or 16 distilled steps at guidance 1. Height and
        width are used as given (multiples of 16); frames are rounded down to 4k+1."""
        return self._run(lambda view, rng: text_to_video(
            view, prompt, rng, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
            steps=num_inference_steps, guidance=guidance_scale, distill=distill,
            max_sequence_length=max_sequence_length, decode_frames=output_type != "latent"),
            [DISTILL_LORA] if distill else [], generator, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs)

    @torch.no_grad()
    def long_video(self, prompt: str, negative_prompt: str | None = None, segments: int = 11, height: int = 480,
                   width: int = 832, num_frames: int = 93, num_cond_frames: int = 13, num_inference_steps: int = 50,
                   guidance_scale: float = 4.0, continuation_size: tuple[int, int] | None = None,
                   refine: bool = True, refine_size: tuple[int, int] | None = None, refine_steps: int = 50,
                   spatial_refine_only: bool = False, bsa: BsaParams | bool = True,
                   generator: torch.Generator | None = None,
                   max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> LongCatVideoLongOutput:
        """Upstream's long-video demo (`run --task long`): t2v, `segments` continuations each conditioned on the
        last `num_cond_frames` frames, then refinement of overlapping windows (with `refine`), one generator
        throughout. Sizes default to the 480p / 720p buckets; returns uint8 frames."""
        rng = _streams(generator, self._execution_device)
        view = self._runner([REFINE_LORA] if refine else [], None, [])
        result = long_video(view, prompt, rng, negative_prompt=negative_prompt, segments=segments, height=height,
                            width=width, num_frames=num_frames, num_cond_frames=num_cond_frames,
                            steps=num_inference_steps, guidance=guidance_scale, vc_size=continuation_size,
                            refine_stage=refine, refine_size=refine_size, refine_steps=refine_steps,
                            spatial_refine_only=spatial_refine_only, bsa=bsa,
                            max_sequence_length=max_sequence_length)
        self.maybe_free_model_hooks()
        frames = result.refined_frames if result.refined_frames is not None else result.stage1_frames
        return LongCatVideoLongOutput(frames=frames, stage1_frames=result.stage1_frames)


class LongCatVideoImageToVideoPipeline(_LongCatVideoBase):
    """Image-to-video (generate_i2v): the image is the first frame, kept clean."""

    @torch.no_grad()
    def __call__(self, image: PIL.Image.Image, prompt: str | list[str] = None,
                 negative_prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 resolution: str = "480p", num_frames: int = 93, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, distill: bool = False,
                 generator: torch.Generator | None = None, output_type: str = "np", return_dict: bool = True,
                 callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None,
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH):
        """Size: `height` and `width` when both are given, else the image's `resolution` bucket."""
        size = _size(height, width)
        return self._run(lambda view, rng: image_to_video(
            view, image, prompt, rng, negative_prompt=negative_prompt, resolution=resolution, size=size,
            num_frames=num_frames, steps=num_inference_steps, guidance=guidance_scale, distill=distill,
            max_sequence_length=max_sequence_length, decode_frames=output_type != "latent"),
            [DISTILL_LORA] if distill else [], generator, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs)


class LongCatVideoVideoContinuationPipeline(_LongCatVideoBase):
    """Video continuation (generate_vc): continue the last `num_cond_frames` frames of `video`."""

    @torch.no_grad()
    def __call__(self, video: Sequence[PIL.Image.Image], prompt: str | list[str] = None,
                 negative_prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 resolution: str = "480p", num_frames: int = 93, num_cond_frames: int = 13,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, distill: bool = False,
                 use_kv_cache: bool = True, enhance_hf: bool | None = None,
                 generator: torch.Generator | None = None, output_type: str = "np", return_dict: bool = True,
                 callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None,
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH):
        """`enhance_hf` (the schedule's high-frequency tail) defaults to on, off with `distill`. With the KV cache
        the callback's `latents` are the noise frames only (the loop's state)."""
        size = _size(height, width)
        return self._run(lambda view, rng: video_continuation(
            view, list(video), prompt, rng, negative_prompt=negative_prompt, resolution=resolution, size=size,
            num_frames=num_frames, num_cond_frames=num_cond_frames, steps=num_inference_steps,
            guidance=guidance_scale, distill=distill, use_kv_cache=use_kv_cache, enhance_hf_schedule=enhance_hf,
            max_sequence_length=max_sequence_length, decode_frames=output_type != "latent"),
            [DISTILL_LORA] if distill else [], generator, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs)


class LongCatVideoRefinePipeline(_LongCatVideoBase):
    """480p → 720p refinement (generate_refine) with the refinement LoRA and block-sparse attention."""

    @torch.no_grad()
    def __call__(self, video: Sequence[PIL.Image.Image] | np.ndarray, prompt: str = "",
                 image: PIL.Image.Image | None = None, cond_video: Sequence[PIL.Image.Image] | None = None,
                 num_cond_frames: int = 0, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, t_thresh: float = 0.5, spatial_refine_only: bool = False,
                 bsa: BsaParams | bool = True, generator: torch.Generator | None = None, output_type: str = "np",
                 return_dict: bool = True,
                 callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None,
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH):
        """video: the stage-1 frames (RGB PIL images or uint8 [N, H, W, 3]); conditioning on `image`
        (num_cond_frames=1) or the last `num_cond_frames` of `cond_video`. Size: `height`/`width`, else the 720p
        bucket. `bsa`: True = the DiT config's parameters, False = dense attention, or explicit BsaParams."""
        size = _size(height, width)
        return self._run(lambda view, rng: refine(
            view, video, rng, prompt=prompt, image=image, video=cond_video, num_cond_frames=num_cond_frames,
            size=size, steps=num_inference_steps, t_thresh=t_thresh, spatial_refine_only=spatial_refine_only,
            bsa=bsa, max_sequence_length=max_sequence_length, decode_frames=output_type != "latent"),
            [REFINE_LORA], generator, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs)


PIPELINE_CLASSES = (LongCatVideoPipeline, LongCatVideoImageToVideoPipeline, LongCatVideoVideoContinuationPipeline,
                    LongCatVideoRefinePipeline)


# ---- helpers -------------------------------------------------------------------------------------------

def _streams(generator: torch.Generator | None, device: torch.device) -> RandomStreams:
    if generator is None:
        return RandomStreams.from_seed(int(torch.randint(0, SEED_RANGE, ())), device)
    if isinstance(generator, list):
        if len(generator) != 1:
            raise LongcatError(f"one generator per call (batch size 1, as upstream), got {len(generator)}")
        generator = generator[0]
    if not isinstance(generator, torch.Generator):
        raise LongcatError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    seed = generator.initial_seed()
    default = torch.Generator(generator.device).manual_seed(seed)
    return RandomStreams(generator, default, seed)


def _size(height: int | None, width: int | None) -> tuple[int, int] | None:
    if (height is None) != (width is None):
        raise LongcatError("give both height and width, or neither (then the resolution bucket decides)")
    return None if height is None else (height, width)


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise LongcatError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")


def _callback(callback, tensor_inputs: list[str] | None, allowed: list[str]) -> tuple[Any, list[str]]:
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        tensor_inputs = callback.tensor_inputs
    tensor_inputs = list(tensor_inputs or ["latents"])
    unknown = [name for name in tensor_inputs if name not in allowed]
    if unknown:
        raise LongcatError(f"callback_on_step_end_tensor_inputs may name {allowed}, got {unknown}")
    return callback, tensor_inputs


def _output(result: TaskResult, output_type: str):
    if output_type == "latent":
        return result.latents
    if output_type == "np":
        return result.frames[None]
    if output_type == "pt":
        return torch.from_numpy(result.frames).permute(0, 3, 1, 2)[None]
    return [to_pil(result.frames)]  # the demos' uint8 conversion: ×255, truncated
