"""Schedules, timestep rounding, the Euler step and CFG-Zero*, against the numbers restated in
reference/pipeline/README.md ("Schedules and the Euler step", "Classifier-free guidance (CFG-Zero*)")."""

from __future__ import annotations

import json

import pytest
import torch
from longcat_reference.pipeline import (
    SchedulerConfig,
    base_schedule,
    cfg_zero_star,
    enhance_hf,
    model_timesteps,
    optimized_scale,
    raw_sigmas,
    truncate,
)
from longcat_reference.pipeline.schedule import Schedule

from longcat_convert.core.errors import LongcatError

# reference/pipeline/README.md, "Resulting schedules with shift 12" (two decimals as printed there)
SPEC_50 = [1000, 998.27, 996.47, 994.60, 992.66, 990.63, 988.52, 986.32, 984.02, 981.62, 979.11, 976.48, 973.72,
           970.83, 967.79, 964.59, 961.22, 957.67, 953.92, 949.95, 945.74, 941.27, 936.52, 931.46, 926.06, 920.28,
           914.08, 907.40, 900.21, 892.43, 883.99, 874.79, 864.74, 853.72, 841.56, 828.09, 813.07, 796.24, 777.24,
           755.62, 730.80, 702.01, 668.22, 627.99, 579.30, 519.17, 443.02, 343.47, 207.77, 11.87]
SPEC_DISTILLED_16 = [1000, 994.71, 988.76, 982.04, 974.36, 965.52, 955.22, 943.09, 923.08, 904.11, 880.31, 849.56,
                     808.29, 750.00, 661.42, 510.64]
SPEC_DISTILLED_RAW_16 = [1.00, .94, .88, .82, .76, .70, .64, .58, .50, .44, .38, .32, .26, .20, .14, .08]
SPEC_REFINE = [500, 443.02, 343.47, 207.77, 11.87]
TWO_DECIMALS = 0.006  # the README prints two decimals (914.0747 is printed 914.08)


def _close(values: torch.Tensor, expected: list[float], tol: float = TWO_DECIMALS) -> bool:
    return len(values) == len(expected) and all(abs(float(v) - e) <= tol for v, e in zip(values, expected, strict=True))


def test_fifty_step_schedule_with_shift_12():
    schedule = base_schedule(50)
    assert _close(schedule.timesteps, SPEC_50)
    assert schedule.sigmas.shape == (51,) and float(schedule.sigmas[-1]) == 0.0
    assert torch.equal(schedule.sigmas[:-1], schedule.timesteps / 1000)
    assert sum(float(t) > 500 for t in schedule.timesteps) == 46


def test_distilled_sixteen_steps():
    assert _close(raw_sigmas(16, distilled=True), SPEC_DISTILLED_RAW_16, 1e-6)
    schedule = base_schedule(16, distilled=True)
    assert _close(schedule.timesteps, SPEC_DISTILLED_16)
    assert abs(float(schedule.sigmas[-2]) - 0.51064) < 1e-4 and float(schedule.sigmas[-1]) == 0.0


def test_enhance_hf_gives_56_steps():
    schedule = enhance_hf(base_schedule(50))
    assert _close(schedule.timesteps, SPEC_50[:46] + [500, 450, 400, 350, 300, 250, 200, 150, 100, 50])
    assert len(schedule) == 56
    assert torch.equal(schedule.sigmas, torch.cat([schedule.timesteps / 1000, torch.zeros(1)]))


def test_refine_t_thresh_gives_5_steps():
    schedule = truncate(base_schedule(50), 0.5)
    assert _close(schedule.timesteps, SPEC_REFINE)
    assert len(schedule) == 5 and float(schedule.sigmas[0]) == 0.5


def test_shift_one_matches_the_spec_counts():
    """The shift-1 counts at the end of the README's "Resulting schedules with shift 12"."""
    one = SchedulerConfig(shift=1.0)
    assert len(base_schedule(50, config=one)) == 50
    assert _close(base_schedule(16, True, one).timesteps[[0, -1]], [1000, 80])
    assert len(enhance_hf(base_schedule(50, config=one), one)) == 35
    assert len(truncate(base_schedule(50, config=one), 0.5, one)) == 26


def test_matches_diffusers_scheduler_given_the_explicit_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for steps, distilled in ((50, False), (16, True), (7, False)):
        reference = FlowMatchEulerDiscreteScheduler(shift=12.0)
        reference.set_timesteps(steps, sigmas=raw_sigmas(steps, distilled).numpy())
        ours = base_schedule(steps, distilled)
        assert torch.equal(reference.timesteps, ours.timesteps) and torch.equal(reference.sigmas, ours.sigmas)
        sample, output = torch.randn(2, 3), torch.randn(2, 3)
        assert torch.equal(reference.step(output, reference.timesteps[0], sample).prev_sample, ours.step(0, output, sample))


def test_distilled_schedules_longer_than_50_are_rejected():
    with pytest.raises(LongcatError, match="at most 50"):
        raw_sigmas(51, distilled=True)
    with pytest.raises(LongcatError, match="repeats a timestep"):
        Schedule(torch.tensor([900.0, 900.0]), torch.tensor([0.9, 0.9, 0.0]))


def test_bf16_model_timesteps_as_in_the_spec():
    """The README's "Timesteps the DiT receives"."""
    rounded = model_timesteps(torch.tensor([998.27, 994.60, 11.87, 513.0, 1000.0]), torch.bfloat16).float()
    assert rounded.tolist() == [1000.0, 996.0, 11.875, 512.0, 1000.0]
    snapped = model_timesteps(base_schedule(50).timesteps, torch.bfloat16).float()
    in_range = snapped[(snapped >= 512) & (snapped < 1024)]
    assert bool((in_range % 4 == 0).all())
    assert torch.equal(model_timesteps(torch.tensor([998.27]), torch.float32), torch.tensor([998.27]))


def test_euler_step_uses_the_negated_velocity():
    """x_next = x + (σ − σ_next)·v for the DiT's v = x0 − ε: one step from σ=1 to σ=0 lands on x0."""
    schedule = Schedule(torch.tensor([1000.0]), torch.tensor([1.0, 0.0]))
    noise, clean = torch.tensor([[0.5, -2.0]]), torch.tensor([[3.0, 1.0]])
    velocity = clean - noise
    assert torch.allclose(schedule.step(0, -velocity, noise), clean)
    half = Schedule(torch.tensor([800.0, 300.0]), torch.tensor([0.8, 0.3, 0.0]))
    assert torch.allclose(half.step(0, -velocity, noise), noise + 0.5 * velocity)


def test_step_result_takes_the_model_output_dtype():
    schedule = base_schedule(3)
    state = torch.randn(1, 4, dtype=torch.bfloat16)
    assert schedule.step(0, torch.randn(1, 4), state).dtype == torch.float32


def test_cfg_zero_star_on_hand_made_tensors():
    uncond = torch.tensor([1.0, 2.0, 0.0, -1.0]).view(1, 1, 1, 2, 2)
    cond = torch.tensor([2.0, 1.0, 1.0, 0.0]).view(1, 1, 1, 2, 2)
    scale = (2 + 2 + 0 + 0) / (1 + 4 + 0 + 1 + 1e-8)  # <c, u> / (|u|² + 1e-8)
    guided = cfg_zero_star(torch.cat([uncond, cond]), 4.0)
    assert guided.shape == (1, 1, 1, 2, 2)
    assert torch.allclose(guided, 4.0 * cond + (1 - 4.0) * scale * uncond, atol=1e-6)
    assert torch.allclose(optimized_scale(cond.view(1, -1), uncond.view(1, -1)), torch.tensor([[scale]]))
    assert torch.allclose(cfg_zero_star(torch.cat([uncond, cond]), 1.0), cond)  # g = 1 gives the cond branch


def test_cfg_zero_star_order_is_uncond_then_cond():
    a, b = torch.randn(1, 2, 2, 2, 2), torch.randn(1, 2, 2, 2, 2)
    assert not torch.allclose(cfg_zero_star(torch.cat([a, b]), 3.0), cfg_zero_star(torch.cat([b, a]), 3.0))


def test_cfg_rejects_batches_other_than_one_sample():
    with pytest.raises(LongcatError, match="single sample"):
        cfg_zero_star(torch.randn(4, 2, 1, 2, 2), 4.0)


def test_scheduler_config_rejects_options_that_change_the_schedule(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"shift": 12.0, "use_dynamic_shifting": True}))
    with pytest.raises(LongcatError, match="use_dynamic_shifting"):
        SchedulerConfig.from_file(path)
    path.write_text(json.dumps({"shift": 7.0, "num_train_timesteps": 1000}))
    assert SchedulerConfig.from_file(path) == SchedulerConfig(7.0, 1000)
