"""Run the user's own upstream LongCat-Video checkout (module `longcat_video`) on a raw tree.

`original_task_results` drives upstream's `LongCatVideoPipeline` through the same planned requests
(preflight.RunPlan: task, prompt, sizes, steps, seed, BSA parameters) and inputs as `dispatch.run_task`
drives ours, and returns the same shape (`{task: [TaskResult, ...]}`, one result per pipeline call), so
`compare_steps` / `compare_frames` work unchanged.

Shims (our own code, applied only when the device is the CPU or flash-attn is not importable; on CUDA
with flash-attn upstream's real kernels run):
* the Triton block-sparse-attention module is replaced by a stub when it cannot be imported;
* self-attention through torch SDPA, or through `bsa_attention` (block-sparse attention in plain
  torch, the same grid bookkeeping as upstream's `_process_attn`) when BSA is on;
* cross-attention through SDPA, one sample at a time (upstream uses varlen flash-attn);
* on the CPU, `torch_gc` (torch.cuda.ipc_collect) is a no-op.
Always (these are about driving, not about the hardware): the DiT is loaded with `cp_split_hw=[1, 1]`
(no context parallelism); `get_condition_shape` returns the planned size instead of the published
480p/720p buckets; refinement's global RNG is seeded with the task seed right before the
first refinement call, which is what our `RandomStreams.default` stream stands for.

This module never imports upstream at import time, and `scripts/check_tasks_upstream.py` loads it by
file path in the upstream venv, so keep its module-level imports to torch, numpy and `longcat_convert.core.errors`
(the task runner imports what it needs of ours when it runs, in our package).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from longcat_convert.core.errors import LongcatError

if TYPE_CHECKING:
    from .preflight import Media, RunPlan

BSA_INTERFACE = "longcat_video.block_sparse_attention.bsa_interface"


# ---- importing the checkout -------------------------------------------------------------------------

def check_checkout(checkout: str | Path) -> Path:
    """The checkout folder, resolved; a one-line LongcatError when it is not a LongCat-Video checkout."""
    path = Path(checkout).expanduser()
    if not path.exists():
        raise LongcatError("the upstream LongCat-Video checkout does not exist", path,
                           fix="pass --original-src the folder of a LongCat-Video clone (it holds longcat_video/)")
    if not path.is_dir():
        raise LongcatError("the upstream LongCat-Video checkout is not a folder", path)
    if not (path / "longcat_video" / "pipeline_longcat_video.py").is_file():
        raise LongcatError("not a LongCat-Video checkout: no longcat_video/pipeline_longcat_video.py in it", path,
                           fix="pass the folder of a clone of github.com/meituan-longcat/LongCat-Video")
    return path.resolve()


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def needs_shims(device: str | torch.device) -> bool:
    return torch.device(device).type == "cpu" or not flash_attn_available()


def import_upstream(checkout: str | Path, shims: bool) -> types.ModuleType:
    """Import `longcat_video` from `checkout` (first on sys.path); install the shims when `shims`."""
    root = check_checkout(checkout)
    loaded = sys.modules.get("longcat_video")
    if loaded is not None:
        where = Path(loaded.__file__ or "").resolve().parent.parent
        if where != root:
            raise LongcatError(f"longcat_video is already imported from {where}", root,
                               fix="run in a fresh process")
    elif str(root) not in sys.path:
        sys.path.insert(0, str(root))
    fix = f"pip install -r {root / 'requirements.txt'}"
    try:
        _import_bsa_interface(shims)
        module = importlib.import_module("longcat_video.pipeline_longcat_video")
        importlib.import_module("longcat_video.modules.attention")
    except ModuleNotFoundError as exc:
        missing = (exc.name or str(exc)).split(".")[0]
        raise LongcatError(f"the upstream checkout needs the Python package {missing!r}, which is not installed",
                           root, fix=fix) from exc
    except ImportError as exc:
        raise LongcatError(f"cannot import longcat_video from the checkout: {exc}", root, fix=fix) from exc
    if shims:
        install_shims()
    return module


def _import_bsa_interface(shims: bool) -> None:
    """Upstream's BSA module needs Triton at import time; with the shims a stub stands in when it is missing."""
    if BSA_INTERFACE in sys.modules:
        return
    try:
        importlib.import_module(BSA_INTERFACE)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if not shims or not missing.startswith("triton"):
            raise
        stub = types.ModuleType(BSA_INTERFACE)
        stub.flash_attn_bsa_3d = None  # never called: the self-attention shim takes the BSA path
        sys.modules[BSA_INTERFACE] = stub


# ---- the shims ----------------------------------------------------------------------------------------

def bsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid_q: tuple[int, int, int],
                  grid_k: tuple[int, int, int], sparsity: float, cdf_threshold: float | None = None,
                  chunk_3d_shape_q: Iterable[int] = (4, 4, 4), chunk_3d_shape_k: Iterable[int] = (4, 4, 4),
                  **_: Any) -> torch.Tensor:
    """Block-sparse attention in plain torch: block means, top-k blocks, exact softmax
    (reference/README.md, "Block-sparse attention")."""
    if cdf_threshold is not None:
        raise LongcatError("the CPU block-sparse-attention shim implements the top-k selection only "
                           "(cdf_threshold must be None)")
    chunk_q, chunk_k = tuple(chunk_3d_shape_q), tuple(chunk_3d_shape_k)

    def to_blocks(x: torch.Tensor, grid: tuple[int, ...], chunk: tuple[int, ...]) -> torch.Tensor:
        b, h, _, d = x.shape
        n = [g // c for g, c in zip(grid, chunk, strict=True)]
        x = x.reshape(b, h, n[0], chunk[0], n[1], chunk[1], n[2], chunk[2], d)
        return x.permute(0, 1, 2, 4, 6, 3, 5, 7, 8).reshape(b, h, n[0] * n[1] * n[2], -1, d)

    def from_blocks(x: torch.Tensor, grid: tuple[int, ...], chunk: tuple[int, ...]) -> torch.Tensor:
        b, h, _, _, d = x.shape
        n = [g // c for g, c in zip(grid, chunk, strict=True)]
        x = x.reshape(b, h, n[0], n[1], n[2], chunk[0], chunk[1], chunk[2], d)
        return x.permute(0, 1, 2, 5, 3, 6, 4, 7, 8).reshape(b, h, -1, d)

    qb, kb, vb = to_blocks(q, grid_q, chunk_q), to_blocks(k, grid_k, chunk_k), to_blocks(v, grid_k, chunk_k)
    scores = qb.mean(3) @ kb.mean(3).transpose(-1, -2)
    keep = int((1 - sparsity) * kb.shape[2])
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if keep:
        chosen.scatter_(-1, scores.topk(keep, dim=-1).indices, True)
    mask = chosen.repeat_interleave(qb.shape[3], dim=2).repeat_interleave(kb.shape[3], dim=3)
    qf, kf, vf = qb.flatten(2, 3), kb.flatten(2, 3), vb.flatten(2, 3)
    logits = (qf @ kf.transpose(-1, -2)) * q.shape[-1] ** -0.5
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return from_blocks((weights @ vf).reshape(qb.shape), grid_q, chunk_q)


def _self_attention(self: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    shape: tuple[int, int, int]) -> torch.Tensor:
    if self.enable_bsa and shape[0] > 1:
        _, height, width = shape
        grid_q = (q.shape[2] // (height * width), height, width)
        grid_k = (k.shape[2] // (height * width), height, width)
        return bsa_attention(q, k, v, grid_q, grid_k, **self.bsa_params)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)


def _cross_attention(self: Any, x: torch.Tensor, cond: torch.Tensor, kv_seqlen: list[int]) -> torch.Tensor:
    batch, tokens, channels = x.shape
    q = self.q_linear(x).view(1, -1, self.num_heads, self.head_dim)
    k, v = self.kv_linear(cond).view(1, -1, 2, self.num_heads, self.head_dim).unbind(2)
    q, k = self.q_norm(q), self.k_norm(k)
    outs, offset = [], 0
    for b in range(batch):
        qb = q[0, b * tokens:(b + 1) * tokens].transpose(0, 1)
        kb = k[0, offset:offset + kv_seqlen[b]].transpose(0, 1)
        vb = v[0, offset:offset + kv_seqlen[b]].transpose(0, 1)
        offset += kv_seqlen[b]
        outs.append(torch.nn.functional.scaled_dot_product_attention(qb, kb, vb).transpose(0, 1))
    return self.proj(torch.stack(outs, 0).reshape(batch, tokens, channels))


def install_shims() -> None:
    """Attention through SDPA / torch BSA, and torch_gc a no-op without CUDA (idempotent)."""
    from longcat_video import pipeline_longcat_video
    from longcat_video.modules import attention

    attention.Attention._process_attn = _self_attention
    attention.MultiHeadCrossAttention._process_cross_attn = _cross_attention
    if not torch.cuda.is_available():
        pipeline_longcat_video.torch_gc = lambda: None


# ---- loading and recording ----------------------------------------------------------------------------

def load_upstream(tree: str | Path, lora_ranks: dict[str, int], dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> Any:
    """Upstream's LongCatVideoPipeline from a raw tree, every component in `dtype`, both LoRAs loaded."""
    from longcat_video.modules.autoencoder_kl_wan import AutoencoderKLWan
    from longcat_video.modules.longcat_video_dit import LongCatVideoTransformer3DModel
    from longcat_video.modules.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
    from longcat_video.pipeline_longcat_video import LongCatVideoPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    tree = str(tree)
    pipe = LongCatVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(tree, subfolder="tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(tree, subfolder="text_encoder", dtype=dtype),
        vae=AutoencoderKLWan.from_pretrained(tree, subfolder="vae", torch_dtype=dtype),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(tree, subfolder="scheduler"),
        dit=LongCatVideoTransformer3DModel.from_pretrained(tree, subfolder="dit", cp_split_hw=[1, 1],
                                                           torch_dtype=dtype),
    )
    for name, rank in lora_ranks.items():  # upstream's load_lora builds every module with the one rank it is given
        path = Path(tree) / "lora" / f"{name}.safetensors"
        pipe.dit.load_lora(str(path), name, lora_network_dim=rank, lora_network_alpha=rank / 2)
    pipe.to(device)
    return pipe


class Recorder:
    """Captures what one upstream call produces: every scheduler step's output and the final latents."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.steps: list[torch.Tensor] = []
        self.timesteps: list[float] = []
        self.final: torch.Tensor | None = None

    def __enter__(self) -> Recorder:
        step, denormalize = self.pipe.scheduler.step, self.pipe.denormalize_latents

        def recording_step(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            self.steps.append(out[0].detach().float().cpu().clone())
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            if isinstance(timestep, torch.Tensor):
                self.timesteps.append(float(timestep.flatten()[0]))
            elif isinstance(timestep, (int, float)):
                self.timesteps.append(float(timestep))
            return out

        def recording_denormalize(latents: torch.Tensor) -> torch.Tensor:
            self.final = latents.detach().float().cpu().clone()
            return denormalize(latents)

        self.pipe.scheduler.step = recording_step
        self.pipe.denormalize_latents = recording_denormalize
        return self

    def __exit__(self, *exc: object) -> None:
        del self.pipe.scheduler.step, self.pipe.denormalize_latents  # back to the class methods

    def result(self, task: str, frames: np.ndarray) -> Any:
        """A TaskResult like ours: the step states with the (fixed) conditioning latents in front."""
        from .sampler import TaskResult

        if self.final is None:
            raise LongcatError(f"the upstream {task} call never decoded its latents")
        num_cond = self.final.shape[2] - (self.steps[-1].shape[2] if self.steps else self.final.shape[2])
        cond = self.final[:, :, :num_cond]
        steps = [torch.cat([cond, state], dim=2) if num_cond else state for state in self.steps]
        return TaskResult(task, self.final, steps, np.asarray(frames, dtype=np.float32), self.timesteps,
                          {"engine": "upstream", "num_cond_latents": num_cond})


# ---- driving the tasks --------------------------------------------------------------------------------

def _fixed_sizes(pipe: Any, plan: RunPlan) -> None:
    """upstream's get_condition_shape answers with the planned sizes (parity's are explicit, not a bucket)."""
    request, by_resolution = plan.request, {}
    for call in plan.calls:
        if call.task in ("i2v", "vc"):
            by_resolution["480p" if request.task == "long" else request.resolution] = (call.height, call.width)
        elif call.task == "refine":
            by_resolution["720p"] = (call.height, call.width)
    pipe.get_condition_shape = lambda condition, resolution, scale_factor_spatial=32: by_resolution[resolution]


def _with_adapters(pipe: Any, loras: list[str], bsa: bool, bsa_params: dict | None, run: Callable[[], Any]) -> Any:
    """The demos' enable_loras / enable_bsa around one call; `bsa_params` stand in for the config's during it."""
    attentions = [block.attn for block in pipe.dit.blocks] if bsa and bsa_params is not None else []
    configured = [attention.bsa_params for attention in attentions]
    if loras:
        pipe.dit.enable_loras(loras)
    if bsa:
        pipe.dit.enable_bsa()
    for attention in attentions:
        attention.bsa_params = dict(bsa_params)
    try:
        return run()
    finally:
        pipe.dit.disable_all_loras()
        if bsa:
            pipe.dit.disable_bsa()
        for attention, params in zip(attentions, configured, strict=True):
            attention.bsa_params = params


def run_upstream_task(pipe: Any, plan: RunPlan, media: Media) -> list:
    """The planned task on upstream's pipeline, with what `dispatch.run_task` gives ours: one TaskResult per
    upstream call."""
    from .preflight import cond_frames, long_steps, refine_steps
    from .t2v import sampling_defaults

    request = plan.request
    generator = torch.Generator(plan.device).manual_seed(request.seed)
    common = {"generator": generator, "max_sequence_length": request.max_sequence_length}
    results = []

    def call(name: str, run: Callable[[], Any]) -> np.ndarray:
        with Recorder(pipe) as recorder:
            frames = run()[0]
        results.append(recorder.result(name, frames))
        return frames

    _fixed_sizes(pipe, plan)
    if request.task == "long":
        _run_long(pipe, call, plan, common, long_steps(request), cond_frames(request, media))
        return results
    if request.task == "refine":
        def refine() -> Any:
            return pipe.generate_refine(
                image=media.image, video=media.cond_video, prompt=request.prompt, stage1_video=media.video,
                num_cond_frames=cond_frames(request, media), t_thresh=request.t_thresh,
                spatial_refine_only=request.spatial_refine_only, num_inference_steps=refine_steps(request), **common)

        torch.manual_seed(request.seed)  # upstream's refinement draws from the global RNG
        call("refine", lambda: _with_adapters(pipe, ["refinement_lora"], not request.no_bsa, request.bsa_params,
                                              refine))
        return results
    steps, _ = sampling_defaults(request.distill, request.steps, None)
    sampling = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "num_frames": plan.num_frames,
                "use_distill": request.distill, "guidance_scale": plan.guidance, "num_inference_steps": steps, **common}
    loras = ["cfg_step_lora"] if request.distill else []
    if request.task == "t2v":
        call("t2v", lambda: _with_adapters(pipe, loras, False, None, lambda: pipe.generate_t2v(
            height=plan.calls[0].height, width=plan.calls[0].width, **sampling)))
    elif request.task == "i2v":
        call("i2v", lambda: _with_adapters(pipe, loras, False, None, lambda: pipe.generate_i2v(
            image=media.image, resolution=request.resolution, **sampling)))
    else:
        call("vc", lambda: _with_adapters(pipe, loras, False, None, lambda: pipe.generate_vc(
            video=media.video, resolution=request.resolution, num_cond_frames=cond_frames(request, media),
            use_kv_cache=not request.no_kv_cache, enhance_hf=not (request.no_enhance_hf or request.distill),
            **sampling)))
    return results


def _run_long(pipe: Any, call: Callable[[str, Callable[[], Any]], np.ndarray], plan: RunPlan, common: dict,
              steps: tuple[int, int], cond_count: int) -> None:
    """The long-video demo's loop (the one long_video runs) on upstream's methods: t2v, continuations with
    KV cache and enhance_hf, then refinement windows (prompt '')."""
    from .long import long_video_loop

    request, first = plan.request, plan.calls[0]
    sampling = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "num_frames": plan.num_frames,
                "guidance_scale": plan.guidance, "num_inference_steps": steps[0], **common}

    def refine_window(stage1: list, condition: list | None, count: int) -> np.ndarray:
        if condition is None:
            torch.manual_seed(request.seed)  # the global RNG, first used by the first refinement
        return call("refine", lambda: _with_adapters(
            pipe, ["refinement_lora"], not request.no_bsa, request.bsa_params, lambda: pipe.generate_refine(
                video=condition, prompt="", stage1_video=stage1, num_cond_frames=count,
                spatial_refine_only=request.spatial_refine_only, **{**common, "num_inference_steps": steps[1]})))

    long_video_loop(
        lambda: call("t2v", lambda: pipe.generate_t2v(height=first.height, width=first.width, **sampling)),
        lambda current: call("vc", lambda: pipe.generate_vc(
            video=current, resolution="480p", num_cond_frames=cond_count, use_kv_cache=True, offload_kv_cache=False,
            enhance_hf=True, **sampling)),
        None if request.no_refine else refine_window, segments=request.segments, num_frames=plan.num_frames,
        num_cond_frames=cond_count, spatial_refine_only=request.spatial_refine_only)


def original_task_results(checkout: str | Path, raw_tree: str | Path, lora_ranks: dict[str, int],
                          jobs: dict[str, tuple[RunPlan, Media]], dtype: torch.dtype,
                          device: str | torch.device) -> dict:
    """Every planned task run by the upstream pipeline from `checkout` on `raw_tree`: {task: [TaskResult] or
    error}.

    A missing checkout or missing dependency raises LongcatError; a task upstream fails on gives its
    one-line error instead of results (the caller decides what that means).
    """
    import_upstream(checkout, needs_shims(device))
    try:
        pipe = load_upstream(raw_tree, lora_ranks, dtype, device)
    except LongcatError:
        raise
    except Exception as exc:  # upstream's own loaders: any failure is the raw tree's or the checkout's
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        return dict.fromkeys(jobs, f"upstream cannot load the raw tree: {message}")
    results: dict[str, list | str] = {}
    for task, (plan, media) in jobs.items():
        try:
            results[task] = run_upstream_task(pipe, plan, media)
        except LongcatError as exc:
            results[task] = exc.one_line()
        except Exception as exc:  # upstream code: report, do not crash the comparison of the other tasks
            results[task] = " ".join(f"upstream {task} failed: {type(exc).__name__}: {exc}".split())
    return results
