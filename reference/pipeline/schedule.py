"""Sigma / timestep schedules and the Euler step
(reference/pipeline/README.md, "Schedules and the Euler step").

Our own arithmetic, reproducing upstream's `get_timesteps_sigmas` + `FlowMatchEulerDiscreteScheduler`
(static shift, explicit sigma list, terminal 0) and the `enhance_hf` / `t_thresh` table overrides, in
fp32 exactly as upstream computes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longcat_convert.core.errors import LongcatError
from longcat_convert.core.io import read_json_object

NUM_TRAIN_TIMESTEPS = 1000
DISTILL_STEPS = 50  # the teacher schedule the distilled list is sampled from
ENHANCE_HF_START = 500.0  # enhance_hf keeps timesteps above this and appends a uniform tail
ENHANCE_HF_TAIL_STEPS = 10

# Scheduler options whose non-default values change the schedule in ways this module does not implement.
_UNSUPPORTED = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
                "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "stochastic_sampling": False}


@dataclass(frozen=True)
class SchedulerConfig:
    shift: float = 12.0
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    @classmethod
    def from_file(cls, path: str | Path) -> SchedulerConfig:
        """Read `scheduler_config.json`; options that would change the schedule unsupported here are errors."""
        path = Path(path)
        return cls.from_dict(read_json_object(path), path)

    @classmethod
    def from_dict(cls, config: dict, where: str | Path) -> SchedulerConfig:
        """The schedule-relevant part of a scheduler config (a file's, or a loaded scheduler's `config`)."""
        for name, default in _UNSUPPORTED.items():
            if config.get(name, default) not in (default, False, None):
                raise LongcatError(f"scheduler option {name}={config[name]!r} is not supported (LongCat uses "
                                   f"{default!r})", where)
        shift = config.get("shift", 1.0)
        steps = config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS)
        if (isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0 or shift == float("inf")
                or isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
            raise LongcatError(f"bad scheduler shift {shift!r} or num_train_timesteps {steps!r}", where)
        return cls(float(shift), steps)


@dataclass(frozen=True)
class Schedule:
    """The timesteps the loop visits (fp32, [n]) and the sigma table the Euler step reads (fp32, [n+1])."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def __post_init__(self) -> None:
        if self.sigmas.shape[0] != self.timesteps.shape[0] + 1:
            raise LongcatError(f"sigma table has {self.sigmas.shape[0]} entries for {self.timesteps.shape[0]} steps")
        if torch.unique(self.timesteps).numel() != self.timesteps.numel():
            # upstream's step-index lookup would start at the second occurrence and run off the table
            raise LongcatError("the schedule repeats a timestep (distilled schedules allow at most 50 steps)")

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    def step(self, index: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step on the scheduler-side output (the negated DiT velocity): x + (σ_next − σ)·out.

        Computed in fp32 from the fp32 sigma table and cast to the model output's dtype, as upstream does.
        """
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        dt = (sigma_next - sigma).to(sample.device)
        return (sample.to(torch.float32) + dt * model_output).to(model_output.dtype)


def raw_sigmas(steps: int, distilled: bool = False) -> torch.Tensor:
    """The raw sigma list (README, "Raw sigma lists"): linspace(1, 0.001, n), or n entries sampled from
    the 50-step distillation grid."""
    if steps <= 0:
        raise LongcatError(f"the number of steps must be positive, got {steps}")
    if not distilled:
        return torch.linspace(1, 0.001, steps, dtype=torch.float32)
    if steps > DISTILL_STEPS:
        raise LongcatError(f"distilled sampling takes at most {DISTILL_STEPS} steps, got {steps}")
    grid = torch.arange(1, DISTILL_STEPS + 1, dtype=torch.float32) * (NUM_TRAIN_TIMESTEPS // DISTILL_STEPS)
    picks = np.floor(np.linspace(0, DISTILL_STEPS, num=steps, endpoint=False)).astype(np.int64)
    return torch.flip(grid.round().long(), [0])[torch.from_numpy(picks)].float() / NUM_TRAIN_TIMESTEPS


def shifted(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The static shift σ' = s·σ / (1 + (s−1)·σ), in fp32."""
    sigmas = sigmas.to(torch.float32)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def from_timesteps(timesteps: torch.Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    """A table override as upstream does it: sigmas ← timesteps / 1000, then the terminal 0 (no re-shift)."""
    timesteps = timesteps.to(torch.float32)
    return Schedule(timesteps, torch.cat([timesteps / num_train_timesteps, torch.zeros(1)]))


def base_schedule(steps: int, distilled: bool = False, config: SchedulerConfig | None = None) -> Schedule:
    """The raw list through the scheduler's static shift; t = 1000·σ; terminal σ = 0."""
    config = config or SchedulerConfig()
    sigmas = shifted(raw_sigmas(steps, distilled), config.shift)
    return Schedule(sigmas * config.num_train_timesteps, torch.cat([sigmas, torch.zeros(1)]))


def enhance_hf(schedule: Schedule, config: SchedulerConfig | None = None) -> Schedule:
    """vc's tail replacement: keep t > 500, append 500, 450, …, 50."""
    config = config or SchedulerConfig()
    tail = np.linspace(ENHANCE_HF_START, 0, ENHANCE_HF_TAIL_STEPS, dtype=np.float32, endpoint=False)
    kept = schedule.timesteps[schedule.timesteps > ENHANCE_HF_START]
    return from_timesteps(torch.cat([kept, torch.from_numpy(tail)]), config.num_train_timesteps)


def truncate(schedule: Schedule, t_thresh: float, config: SchedulerConfig | None = None) -> Schedule:
    """refine's start: [1000·t_thresh] followed by the timesteps below it."""
    config = config or SchedulerConfig()
    start = torch.tensor(t_thresh * config.num_train_timesteps, dtype=torch.float32)
    below = schedule.timesteps[schedule.timesteps < start]
    return from_timesteps(torch.cat([start[None], below]), config.num_train_timesteps)


def model_timesteps(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The timestep the DiT receives: cast to the DiT's dtype (bf16 in the published runs: 998.27 → 1000)."""
    return t.to(dtype)
