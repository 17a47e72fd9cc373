"""Task parity between a raw tree and its FastVideo conversion, and its failure on damaged conversions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from longcat_reference.bsa import BsaParams
from longcat_reference.pipeline import load_pipeline
from longcat_reference.pipeline.dispatch import bsa_setting, run_task
from longcat_reference.pipeline.preflight import plan_run
from longcat_reference.pipeline.task_parity import (
    TASKS,
    TaskSizes,
    synthetic_inputs,
    task_parity,
    task_request,
)
from safetensors.torch import load_file, save_file

from longcat_convert.conversion import ConvertRequest, convert
from longcat_convert.core.errors import LongcatError
from longcat_convert.core.jsonschemas import schema_errors


@pytest.fixture(scope="module")
def fastvideo(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("task-parity") / "fv"
    convert(ConvertRequest(src=tiny_raw, dst=dst, to="fastvideo", quiet=True))
    return dst


def _damaged(source: Path, dst: Path, relative: str, pick: str, factor: float) -> Path:
    """A copy of `source` whose first tensor containing `pick` in file `relative` is scaled by `factor`."""
    tree = Path(shutil.copytree(source, dst))
    path = tree / relative
    tensors = load_file(path)
    name = next(key for key in sorted(tensors) if pick in key)
    tensors[name] = tensors[name] * factor
    save_file(tensors, path, metadata={"format": "pt"})
    return tree


def _cases(report: dict) -> dict[str, dict]:
    return {case["name"]: case for case in report["cases"]}


def test_every_task_passes_raw_against_fastvideo(tiny_raw, fastvideo):
    report = task_parity(tiny_raw, fastvideo)
    assert schema_errors("parity-report", report) == []
    assert report["level"] == "task" and report["passed"], [c for c in report["cases"] if not c["passed"]]
    assert sorted(_cases(report)) == sorted(f"{task}:{part}" for task in TASKS for part in ("latents", "frames"))
    cases = _cases(report)
    # without a LoRA both layouts run identical arithmetic; with one, merged vs runtime adapters differ a little
    assert cases["t2v:latents"]["rel_l2"] == 0.0
    assert 0.0 < cases["t2v-distill:latents"]["rel_l2"] < 1e-5
    assert cases["refine:frames"]["psnr"] > 80
    assert len(cases["vc:latents"]["per_step_rel_l2"]) == 12
    assert report["seconds"] < 60


def test_parity_tasks_are_run_requests_whose_plan_is_what_runs(tiny_raw):
    """Refinement and long video with parity's own fields: BSA parameters and at least 2 refinement steps."""
    pipe, sizes = load_pipeline(tiny_raw, "float32"), TaskSizes()
    for task in ("refine", "long"):
        request, media = task_request(task, sizes, 1, 0, "float32", "cpu", synthetic_inputs(sizes, 0))
        assert bsa_setting(request) == BsaParams(sparsity=0.5, cdf_threshold=None, chunk_q=(4, 4, 4),
                                                 chunk_k=(4, 4, 4))
        plan = plan_run(tiny_raw, request, media, measure=False)
        planned = [(call.task, call.height, call.width, call.steps) for call in plan.calls for _ in range(call.repeat)]
        ran = run_task(pipe, plan, media).results
        assert planned == [(r.task, r.info["height"], r.info["width"], r.info["steps"]) for r in ran]
        assert [r.info["steps"] for r in ran if r.task == "refine"] == [2] * (2 if task == "long" else 1)


def test_a_damaged_dit_weight_fails_parity(tiny_raw, fastvideo, tmp_path):
    damaged = _damaged(fastvideo, tmp_path / "fv", "transformer/diffusion_pytorch_model.safetensors",
                       "blocks.1.ffn", 1.01)
    report = task_parity(tiny_raw, damaged, tasks=["t2v"], steps=2)
    assert not report["passed"]
    assert {name: case["passed"] for name, case in _cases(report).items()} == {"t2v:latents": False,
                                                                               "t2v:frames": False}
    assert _cases(report)["t2v:latents"]["rel_l2"] > 1e-3
    assert schema_errors("parity-report", report) == []


def test_a_damaged_lora_fails_only_the_task_that_uses_it(tiny_raw, fastvideo, tmp_path):
    # one target's up-projection doubled, as a wrong alpha scale would do
    damaged = _damaged(fastvideo, tmp_path / "fv", "lora/distilled/cfg_step_lora.safetensors", "lora_B", 2.0)
    report = task_parity(tiny_raw, damaged, tasks=["t2v", "t2v-distill"], steps=2)
    verdicts = {name: case["passed"] for name, case in _cases(report).items()}
    assert verdicts == {"t2v:latents": True, "t2v:frames": True, "t2v-distill:latents": False,
                        "t2v-distill:frames": False}


def test_an_unloadable_conversion_is_reported_not_raised(tiny_raw, fastvideo, tmp_path):
    broken = Path(shutil.copytree(fastvideo, tmp_path / "fv"))
    path = broken / "transformer/diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, path, metadata={"format": "pt"})
    report = task_parity(tiny_raw, broken, tasks=["i2v"], steps=1)
    assert not report["passed"] and all("cannot load" in case["error"] for case in report["cases"])


def test_bad_arguments_raise(tiny_raw, fastvideo):
    with pytest.raises(LongcatError, match="unknown task"):
        task_parity(tiny_raw, fastvideo, tasks=["t3v"])
    with pytest.raises(LongcatError, match="raw, diffusers or fastvideo|no DiT config"):
        task_parity(fastvideo / "vae", fastvideo, tasks=["t2v"])
    assert torch.get_num_threads() >= 1
