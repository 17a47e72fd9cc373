"""Task-level parity: run every task from a raw tree and from a converted tree with the same seeds and
inputs, and compare the latent state after every step and the decoded frames.

Runs on tiny sizes by default (32x48 pixels, 9 frames, 3 steps, 32 text tokens). Refinement and long
video use BSA with sparsity 0.5: the published 0.9375 keeps ⌊0.0625·M⌋ key blocks, which is none on
grids this small, so block selection would not be exercised at all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from longcat_convert.core import jsonschemas, progress
from longcat_convert.core.errors import LongcatError
from longcat_convert.core.torch_threads import torch_threads

from ..loading import Tree, open_tree, upstream_lora_ranks
from ..metrics import compare_outputs
from .components import Pipeline, load_pipeline, resolve_dtype
from .dispatch import run_task
from .original import check_checkout, original_task_results
from .preflight import Media, RunPlan, RunRequest, plan_run
from .sampler import TaskResult

TASKS = ("t2v", "t2v-distill", "i2v", "vc", "vc-nokv", "refine", "long")
THRESHOLDS = {"float32": 1e-4, "bfloat16": 5e-2}  # rel L2, for latents and frames alike
PROMPT = "a cat sits on a wooden table next to a window"
PARITY_BSA = {"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}
Job = tuple[RunPlan, Media]  # a planned task and its inputs


@dataclass(frozen=True)
class TaskSizes:
    height: int = 32
    width: int = 48
    num_frames: int = 9
    num_cond_frames: int = 5
    vc_frames: int = 13
    refine_height: int = 64
    refine_width: int = 128
    long_refine_size: tuple[int, int] = (64, 64)  # long video refines 2 windows; kept small
    max_sequence_length: int = 32


def synthetic_inputs(sizes: TaskSizes, seed: int) -> Media:
    """Deterministic RGB inputs: smooth gradients plus seeded noise, the same for both trees (an image, a video
    and refinement's conditioning video)."""
    rs = np.random.RandomState(seed)

    def frame(height: int, width: int, phase: float) -> Image.Image:
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([np.sin(x / width * 6 + phase), np.cos(y / height * 5 - phase), np.sin((x + y) / 9 + phase)],
                        axis=-1)
        pixels = 127.5 + 90 * base + rs.normal(0, 20, (height, width, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    image = frame(sizes.height + 8, sizes.width + 12, 0.0)
    video = [frame(sizes.height, sizes.width, 0.3 * k) for k in range(sizes.num_frames)]
    refine_cond = [frame(sizes.refine_height, sizes.refine_width, 0.2 * k) for k in range(4)]
    return Media(image, video, refine_cond)


def task_request(task: str, sizes: TaskSizes, steps: int, seed: int, dtype: str, device: str, inputs: Media
                 ) -> tuple[RunRequest, Media]:
    """Parity task `task` as the `run` request and inputs that run it (t2v-distill and vc-nokv are t2v with
    distill and vc with no_kv_cache; refinement runs at least 2 steps, with PARITY_BSA)."""
    common = {"prompt": PROMPT, "seed": seed, "dtype": dtype, "device": str(device),
              "max_sequence_length": sizes.max_sequence_length}
    stage1 = {**common, "height": sizes.height, "width": sizes.width, "num_frames": sizes.num_frames, "steps": steps}
    if task in ("t2v", "t2v-distill"):
        return RunRequest("t2v", distill=task == "t2v-distill", **stage1), Media()
    if task == "i2v":
        return RunRequest("i2v", **stage1), Media(image=inputs.image)
    if task in ("vc", "vc-nokv"):
        return (RunRequest("vc", **{**stage1, "num_frames": sizes.vc_frames}, num_cond_frames=sizes.num_cond_frames,
                           no_kv_cache=task == "vc-nokv"), Media(video=inputs.video))
    if task == "refine":
        return (RunRequest("refine", height=sizes.refine_height, width=sizes.refine_width, steps=max(steps, 2),
                           num_cond_frames=2, bsa_params=PARITY_BSA, **common),
                Media(video=inputs.video[:5], cond_video=inputs.cond_video))
    if task == "long":
        refine_height, refine_width = sizes.long_refine_size
        return (RunRequest("long", segments=1, num_cond_frames=sizes.num_cond_frames, refine_height=refine_height,
                           refine_width=refine_width, refine_steps=max(steps, 2), spatial_refine_only=True,
                           bsa_params=PARITY_BSA, **stage1), Media())
    raise LongcatError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def _jobs(tree: Tree, tasks: list[str], sizes: TaskSizes, steps: int, seed: int, dtype: str, device: str
          ) -> dict[str, Job]:
    """Every task planned (and so checked) once; both sides run these plans."""
    inputs, jobs = synthetic_inputs(sizes, seed), {}
    for task in tasks:
        request, media = task_request(task, sizes, steps, seed, dtype, device, inputs)
        jobs[task] = (plan_run(tree.root, request, media, measure=False), media)
    return jobs


# ---- comparison --------------------------------------------------------------------------------------

def _case(name: str, fields: dict, tolerance: float, dtype: str) -> dict:
    rel = fields.get("rel_l2")
    passed = rel is not None and rel <= tolerance and "error" not in fields
    return {"name": name, "passed": passed, **fields, "tolerance": tolerance, "dtype": dtype}


def compare_steps(got: list[TaskResult], want: list[TaskResult]) -> dict:
    """Worst per-step comparison over every call of the task (the final state is the last step)."""
    if [len(r.steps) for r in got] != [len(r.steps) for r in want]:
        return {"error": f"step counts differ: {[len(r.steps) for r in got]} vs {[len(r.steps) for r in want]}"}
    per_step, worst = [], None
    for call, (mine, theirs) in enumerate(zip(got, want, strict=True)):
        for index, (a, b) in enumerate(zip(mine.steps, theirs.steps, strict=True)):
            if a.shape != b.shape:
                return {"error": f"call {call} step {index}: shape {list(a.shape)} != {list(b.shape)}"}
            found = compare_outputs(a, b, peak=float(b.abs().max()))
            per_step.append(found["rel_l2"])
            if worst is None or _badness(found) > _badness(worst[1]):
                worst = ((call, index), found)
    final = compare_outputs(got[-1].latents.float(), want[-1].latents.float())
    return {**worst[1], "worst_step": list(worst[0]), "final_rel_l2": final["rel_l2"],
            "per_step_rel_l2": per_step, "shape": list(want[-1].latents.shape)}


def _badness(found: dict) -> float:
    return math.inf if found["rel_l2"] is None else found["rel_l2"]


def compare_frames(got: list[TaskResult], want: list[TaskResult]) -> dict:
    mine, theirs = got[-1].frames, want[-1].frames
    if mine.shape != theirs.shape:
        return {"error": f"frame shapes differ: {list(mine.shape)} vs {list(theirs.shape)}"}
    return {**compare_outputs(mine, theirs, peak=1.0), "shape": list(theirs.shape)}


# ---- the report --------------------------------------------------------------------------------------

def _tree_info(root: str | Path) -> dict:
    try:
        tree = open_tree(root)
    except LongcatError:
        return {"path": str(root)}
    return tree.describe()


def _run_all(load: Callable[[], Pipeline], jobs: dict[str, Job]) -> dict[str, list[TaskResult] | str]:
    try:
        pipe = load()
    except LongcatError as exc:
        return dict.fromkeys(jobs, f"cannot load the pipeline: {exc.one_line()}")
    results: dict[str, list[TaskResult] | str] = {}
    for number, (task, (plan, media)) in enumerate(jobs.items(), start=1):
        try:
            with progress.scope(f"task {number}/{len(jobs)} {task}"):
                results[task] = run_task(pipe, plan, media).results
        except LongcatError as exc:
            results[task] = exc.one_line()
    return results


def task_parity(raw_tree: str | Path, converted_tree: str | Path, tasks: Iterable[str] = TASKS, steps: int = 3,
                seed: int = 0, dtype: str = "float32", device: str = "cpu", thresholds: dict[str, float] | None = None,
                sizes: TaskSizes | None = None, threads: int | None = 1, original_src: str | Path | None = None) -> dict:
    """Run `tasks` from both trees and compare; a report shaped like schemas/parity-report.schema.json.

    `original_src`: a LongCat-Video checkout; the raw side is then run by upstream's own pipeline from it
    (`original.original_task_results`) instead of ours, the converted side still by ours.

    Cases per task: `<task>:latents` (worst rel L2 over the state after every step) and `<task>:frames`
    (decoded frames, with PSNR). Problems in the raw tree or the arguments raise LongcatError; problems in
    the converted tree are reported as failed cases.
    """
    tasks = list(dict.fromkeys(tasks))
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise LongcatError(f"unknown task(s) {unknown or '(none given)'}; choose from {', '.join(TASKS)}")
    if steps < 1:
        raise LongcatError(f"steps must be positive, got {steps}")
    torch_dtype = resolve_dtype(dtype)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    tolerance = {**THRESHOLDS, **(thresholds or {})}[dtype_name]
    sizes = sizes or TaskSizes()
    checkout = check_checkout(original_src) if original_src is not None else None
    raw = open_tree(raw_tree)
    if checkout is not None and raw.layout != "raw":
        raise LongcatError(f"the upstream pipeline (--original-src) reads raw trees only, this one is {raw.layout}",
                           raw.root)
    jobs = _jobs(raw, tasks, sizes, steps, seed, dtype_name, device)
    started = time.perf_counter()
    with torch_threads(threads):  # tiny tensors run faster on one thread
        with progress.scope("raw tree"):
            if checkout is None:
                reference = _run_all(lambda: load_pipeline(raw, torch_dtype, device), jobs)
            else:
                with progress.stage("upstream pipeline"):
                    reference = original_task_results(checkout, raw.root, upstream_lora_ranks(raw), jobs,
                                                      torch_dtype, device)
        failed = {task: out for task, out in reference.items() if isinstance(out, str)}
        if failed:
            task, error = next(iter(failed.items()))
            raise LongcatError(f"the raw tree cannot run task {task}: {error}", raw.root)
        with progress.scope("converted tree"):
            outputs = _run_all(lambda: load_pipeline(converted_tree, torch_dtype, device), jobs)
    cases = []
    for task in tasks:
        got, want = outputs[task], reference[task]
        if isinstance(got, str):
            cases += [_case(f"{task}:{part}", {"error": got}, tolerance, dtype_name) for part in ("latents", "frames")]
            continue
        cases.append(_case(f"{task}:latents", compare_steps(got, want), tolerance, dtype_name))
        cases.append(_case(f"{task}:frames", compare_frames(got, want), tolerance, dtype_name))
    raw_info = _tree_info(raw_tree)
    if checkout is not None:
        raw_info["engine"] = f"upstream LongCat-Video pipeline from {checkout}"
    return jsonschemas.checked_report("parity-report", {
        "level": "task", "raw": raw_info, "converted": _tree_info(converted_tree), "dtype": dtype_name,
        "device": str(device), "seed": seed, "steps": steps, "tolerance": tolerance, "sizes": sizes.__dict__,
        "seconds": round(time.perf_counter() - started, 2), "cases": cases,
        "passed": all(case["passed"] for case in cases)})
