"""The denoising loop every task shares (reference/pipeline/README.md, "The denoising loop"), and the
result type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from longcat_convert.core import progress
from longcat_convert.core.errors import LongcatError

from ..dit import KVCache
from .components import Pipeline
from .guidance import cfg_zero_star, uses_cfg
from .schedule import Schedule, model_timesteps
from .text import TextBatch


@dataclass
class TaskResult:
    """What one task call produced.

    latents: the final normalized latents [1, 16, T_lat, h, w] on the CPU, in the dtype the sampler
      ended with (fp32, or the DiT dtype for vc without KV cache), conditioning frames included;
    steps: the full latent state after every Euler step (fp32 CPU copies, conditioning included);
    frames: decoded float32 [T, H, W, 3] in [0, 1] (None when decoding was skipped);
    timesteps: the fp32 timesteps visited; info: sizes and settings that shaped the run.
    """

    task: str
    latents: torch.Tensor
    steps: list[torch.Tensor]
    frames: np.ndarray | None
    timesteps: list[float]
    info: dict = field(default_factory=dict)


StepHook = Callable[[int, torch.Tensor], torch.Tensor]


def denoise(pipe: Pipeline, latents: torch.Tensor, schedule: Schedule, text: TextBatch, guidance: float, *,
            num_cond: int = 0, kv_cache: KVCache | None = None, full_state: StepHook | None = None
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the loop; return the final latents and the state after each step.

    num_cond: leading latent frames of `latents` that are clean conditioning: they get timestep 0, the
      DiT sees them as conditioning, and only the frames after them are stepped (written back in place,
      so the state keeps its dtype). With num_cond = 0 the whole tensor is replaced by the step's fp32
      result. kv_cache: the conditioning was cached and `latents` holds only noise frames.
    full_state: maps the loop state to the recorded full state (vc with KV cache prepends the cond).
    """
    cfg = uses_cfg(guidance)
    model_batch = 2 if cfg else 1
    if text.batch != model_batch:
        raise LongcatError(f"internal: text batch {text.batch} does not match the model batch {model_batch}")
    dit_cond = kv_cache.num_latents if kv_cache is not None else num_cond
    steps: list[torch.Tensor] = []
    timesteps = enumerate(schedule.timesteps.to(pipe.device))
    for index, t in progress.steps(timesteps, len(schedule), "denoising"):
        model_input = (torch.cat([latents] * 2) if cfg else latents).to(pipe.dit_dtype)
        timestep = model_timesteps(t.expand(model_batch), pipe.dit_dtype)
        timestep = timestep.unsqueeze(-1).repeat(1, model_input.shape[2])
        timestep[:, :num_cond] = 0
        with torch.no_grad():
            output = pipe.dit(model_input, timestep, text.embeds, text.mask, num_cond_latents=dit_cond,
                              kv_cache=kv_cache)
        if cfg:
            output = cfg_zero_star(output, guidance)
        # the DiT predicts x0 − ε; the Euler step wants its negation
        output = -output
        if num_cond:
            latents[:, :, num_cond:] = schedule.step(index, output[:, :, num_cond:], latents[:, :, num_cond:])
        else:
            latents = schedule.step(index, output, latents)
        if pipe.step_end is not None:
            replaced = pipe.step_end(index, len(schedule), t, latents)
            latents = latents if replaced is None else replaced
        state = full_state(index, latents) if full_state else latents
        steps.append(state.detach().float().cpu().clone())
    return latents, steps


def timesteps_list(schedule: Schedule) -> list[float]:
    return [float(t) for t in schedule.timesteps]
