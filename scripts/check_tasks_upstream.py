"""Run the UPSTREAM LongCat-Video pipeline and ours on the same tiny tree, seed and inputs; compare.

usage (from the repo, in the project venv):
    python scripts/check_tasks_upstream.py [TREE] [--work DIR] [--seed 0] [--tol 1e-4]
        [--upstream-python ~/.cache/longcat-oracle/venv/bin/python] [--original-src ~/.cache/longcat-oracle/longcat]
        [--prompt TEXT] [--cases t2v vc ...]

Without TREE a tiny raw tree is built in --work. The script runs our tasks in this process (each case a
`run` request, planned and run by the dispatcher `longcat-convert run` uses), then runs itself with
`--upstream` in the upstream venv, exchanging `.pt` files through --work. That process does not
import our package: it loads reference/pipeline/original.py by file path (the upstream engine behind
`longcat-convert parity --level task --original-src`), whose shims and loader it uses. Everything is fp32 on the CPU, at 32x48 pixels (refinement 64x128), 3 steps, 32 text
tokens. Cases: t2v, t2v-distill (cfg_step_lora, distilled schedule, guidance 1), i2v, vc (KV cache,
enhance_hf), vc-nokv, refine with video conditioning, refine with image conditioning and
spatial_refine_only, refine without conditioning, and the long-video demo's loop (t2v, 1 continuation,
2 refinement windows; frames through the demo's uint8 round trips). Refinement uses BSA with sparsity 0.5 on both sides
(the published 0.9375 selects no block on grids this small).

Per case it prints rel L2 / max abs of the final latents and the worst step (both within --tol for a pass)
and of the frames (within --tol too, except the long video's, which are rounded to uint8 between segments
as upstream's demo does: they may differ by one uint8 level wherever a value sits on a rounding edge).
Exit 0 when every case passes, 1 otherwise, 2 on bad input.

CPU shims for the upstream side (our own code in reference/pipeline/original.py, applied only in the
--upstream process):
* the Triton BSA module stubbed; self/cross attention through SDPA, self-attention through a torch
  block-sparse attention when BSA is on (same grid bookkeeping as upstream's `_process_attn`);
* `torch_gc` (calls torch.cuda.ipc_collect) made a no-op; `pipe.to("cpu")`; CPU generators;
* the DiT loaded with `cp_split_hw=[1, 1]`; everything in fp32, so upstream's autocast('cuda') islands
  are no-ops;
* `get_condition_shape` returns the explicit tiny size (the published buckets start at 320 pixels);
* refinement draws from the global RNG: it is seeded with the task seed right before the call, which
  is what our `RandomStreams.default` stream stands for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ORACLE_HOME = Path(os.environ.get("ORACLE_HOME", Path.home() / ".cache/longcat-oracle"))
DEFAULT_UPSTREAM_PYTHON = ORACLE_HOME / "venv/bin/python"
DEFAULT_CHECKOUT = Path(os.environ.get("LONGCAT_UPSTREAM") or ORACLE_HOME / "longcat")
PROMPT = ""  # every case's prompt: --prompt, by default task parity's (set by main in both processes)
NEGATIVE = "blurred details, low quality"
SIZE = (32, 48)
REFINE_SIZE = (64, 128)
MAX_LEN = 32
STEPS = 3
UINT8_FRAMES = ("long",)  # cases whose frames are rounded to uint8 between segments, as upstream's demo does
UINT8_LEVEL = 1 / 255 + 1e-6  # one uint8 level (frames are in [0, 1])
BSA = {"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}

# name -> what to run; shared by both sides so they cannot drift apart
CASES = {
    "t2v": {"task": "t2v", "num_frames": 9, "steps": STEPS, "guidance": 4.0},
    "t2v-distill": {"task": "t2v", "num_frames": 9, "steps": 4, "guidance": 1.0, "distill": True},
    "i2v": {"task": "i2v", "num_frames": 9, "steps": STEPS, "guidance": 4.0},
    "vc": {"task": "vc", "num_frames": 13, "num_cond_frames": 5, "steps": STEPS, "guidance": 4.0, "kv": True},
    "vc-nokv": {"task": "vc", "num_frames": 13, "num_cond_frames": 5, "steps": STEPS, "guidance": 4.0, "kv": False},
    "refine": {"task": "refine", "steps": STEPS, "cond": "video", "num_cond_frames": 2},
    "refine-image": {"task": "refine", "steps": STEPS, "cond": "image", "num_cond_frames": 1,
                     "spatial_refine_only": True},
    "refine-plain": {"task": "refine", "steps": STEPS, "cond": None, "num_cond_frames": 0},
    # the long-video demo's loop: t2v, `segments` continuations, then segments + 1 refinement windows
    "long": {"task": "long", "segments": 1, "num_frames": 9, "num_cond_frames": 5, "steps": STEPS, "guidance": 4.0},
}


# ---- inputs (numpy + PIL only, identical in both venvs) -------------------------------------------

def _frame(rs: np.random.RandomState, height: int, width: int, phase: float):
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / width * 6 + phase), np.cos(y / height * 5 - phase), np.sin((x + y) / 9 + phase)], -1)
    return Image.fromarray(np.clip(127.5 + 90 * base + rs.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8))


def make_inputs(seed: int) -> dict:
    rs = np.random.RandomState(seed)
    return {"image": _frame(rs, 40, 60, 0.0),
            "video": [_frame(rs, *SIZE, 0.3 * k) for k in range(9)],
            "stage1": [_frame(rs, *SIZE, 0.25 * k) for k in range(5)],
            "refine_video": [_frame(rs, *REFINE_SIZE, 0.2 * k) for k in range(4)],
            "refine_image": _frame(rs, *REFINE_SIZE, 1.0)}


# ---- our side -----------------------------------------------------------------------------------------

def run_ours(tree: Path, seed: int) -> dict:
    """Every case as a `run` request, planned and run by the dispatcher `run` itself uses."""
    from longcat_reference.pipeline import load_pipeline
    from longcat_reference.pipeline.dispatch import run_task
    from longcat_reference.pipeline.preflight import plan_run

    pipe = load_pipeline(tree, "float32")
    inputs = make_inputs(seed)
    results = {}
    for name, case in CASES.items():
        request, media = _request(case, inputs, seed)
        done = run_task(pipe, plan_run(tree, request, media, measure=False), media)
        frames = done.arrays["frames"]  # uint8 for long video
        frames = frames.astype(np.float32) / 255 if frames.dtype == np.uint8 else frames
        # what upstream's scheduler returns each step: the stepped (non-conditioning) frames, call after call
        steps = [state[:, :, call.info["num_cond_latents"]:] for call in done.results for state in call.steps]
        results[name] = {"latents": done.results[-1].latents.float(), "frames": torch.from_numpy(frames),
                         "steps": steps}
    return results


def _request(case: dict, inputs: dict, seed: int):
    """A case as the `run` request and inputs that run it."""
    from longcat_reference.pipeline.preflight import Media, RunRequest

    options = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": seed, "dtype": "float32", "steps": case["steps"],
               "max_sequence_length": MAX_LEN, **{key: case[key] for key in ("num_frames", "num_cond_frames",
                                                                              "guidance", "segments") if key in case}}
    if case["task"] == "refine":
        media = Media(video=inputs["stage1"], image=inputs["refine_image"] if case["cond"] == "image" else None,
                      cond_video=inputs["refine_video"] if case["cond"] == "video" else None)
        return RunRequest("refine", height=REFINE_SIZE[0], width=REFINE_SIZE[1], bsa_params=BSA,
                          spatial_refine_only=case.get("spatial_refine_only", False), **options), media
    media = {"i2v": Media(image=inputs["image"]), "vc": Media(video=inputs["video"])}.get(case["task"], Media())
    request = RunRequest(case["task"], height=SIZE[0], width=SIZE[1], distill=case.get("distill", False),
                         no_kv_cache=not case.get("kv", True), **options)
    if case["task"] == "long":
        request = dataclasses.replace(request, refine_height=REFINE_SIZE[0], refine_width=REFINE_SIZE[1],
                                      bsa_params=BSA)
    return request, media


# ---- upstream side (runs in the upstream venv) ---------------------------------------------------------

def _original_module():
    """reference/pipeline/original.py (the upstream engine and its CPU shims), loaded by file path: the
    upstream venv does not have our package installed, only `longcat_convert.core.errors` from the repo is needed."""
    import importlib.util

    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("longcat_original", REPO / "reference" / "pipeline" / "original.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _upstream_case(pipe, case: dict, inputs: dict, seed: int) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    common = {"generator": generator, "max_sequence_length": MAX_LEN, "num_inference_steps": case["steps"]}
    pipe.get_condition_shape = lambda condition, resolution, scale_factor_spatial=32: (
        REFINE_SIZE if resolution == "720p" else SIZE)
    if case["task"] == "long":
        return _upstream_long(pipe, case, generator)
    if case["task"] == "t2v":
        if case.get("distill"):
            pipe.dit.enable_loras(["cfg_step_lora"])
        frames = pipe.generate_t2v(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE[0], width=SIZE[1],
                                   num_frames=case["num_frames"], use_distill=case.get("distill", False),
                                   guidance_scale=case["guidance"], **common)[0]
        pipe.dit.disable_all_loras()
        return frames
    if case["task"] == "i2v":
        return pipe.generate_i2v(image=inputs["image"], prompt=PROMPT, negative_prompt=NEGATIVE,
                                 num_frames=case["num_frames"], guidance_scale=case["guidance"], **common)[0]
    if case["task"] == "vc":
        return pipe.generate_vc(video=inputs["video"], prompt=PROMPT, negative_prompt=NEGATIVE,
                                num_frames=case["num_frames"], num_cond_frames=case["num_cond_frames"],
                                guidance_scale=case["guidance"], use_kv_cache=case["kv"], **common)[0]
    pipe.dit.enable_loras(["refinement_lora"])
    pipe.dit.enable_bsa()
    for block in pipe.dit.blocks:
        block.attn.bsa_params = dict(BSA)
    torch.manual_seed(seed)  # upstream's refinement draws from the global RNG
    frames = pipe.generate_refine(
        image=inputs["refine_image"] if case["cond"] == "image" else None,
        video=inputs["refine_video"] if case["cond"] == "video" else None,
        prompt=PROMPT, stage1_video=inputs["stage1"], num_cond_frames=case["num_cond_frames"],
        spatial_refine_only=case.get("spatial_refine_only", False), **common)[0]
    pipe.dit.disable_all_loras()
    pipe.dit.disable_bsa()
    return frames


def _uint8_frames(output: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray((output[i] * 255).astype(np.uint8)) for i in range(output.shape[0])]


def _upstream_long(pipe, case: dict, generator: torch.Generator) -> np.ndarray:
    """run_demo_long_video's loop at tiny sizes (our own driver of the upstream pipeline methods)."""
    from PIL import Image

    common = {"generator": generator, "max_sequence_length": MAX_LEN, "num_inference_steps": case["steps"]}
    count, cond_count = case["num_frames"], case["num_cond_frames"]
    video = _uint8_frames(pipe.generate_t2v(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE[0], width=SIZE[1],
                                            num_frames=count, guidance_scale=case["guidance"], **common)[0])
    target, current, frames = video[0].size, video, list(video)
    for _ in range(case["segments"]):
        output = pipe.generate_vc(video=current, prompt=PROMPT, negative_prompt=NEGATIVE, resolution="480p",
                                  num_frames=count, num_cond_frames=cond_count, guidance_scale=case["guidance"],
                                  use_kv_cache=True, offload_kv_cache=False, enhance_hf=True, **common)[0]
        current = [frame.resize(target, Image.BICUBIC) for frame in _uint8_frames(output)]
        frames.extend(current[cond_count:])
    pipe.dit.enable_loras(["refinement_lora"])
    pipe.dit.enable_bsa()
    for block in pipe.dit.blocks:
        block.attn.bsa_params = dict(BSA)
    torch.manual_seed(common["generator"].initial_seed())  # the global RNG, first used here
    condition, current_count, start, refined = None, 0, 0, []
    for _ in range(case["segments"] + 1):
        output = pipe.generate_refine(video=condition, prompt="", stage1_video=frames[start:start + count],
                                      num_cond_frames=current_count, **common)[0]
        window = _uint8_frames(output)
        refined.extend(window[current_count:])
        condition, current_count, start = window, 2 * cond_count, start + count - cond_count
    pipe.dit.disable_all_loras()
    pipe.dit.disable_bsa()
    return np.stack([np.asarray(frame) for frame in refined]).astype(np.float32) / 255


def run_upstream(tree: Path, seed: int, checkout: Path, lora_ranks: dict[str, int]) -> dict:
    original = _original_module()
    original.import_upstream(checkout, shims=True)
    pipe = original.load_upstream(tree, lora_ranks)  # fp32 on the CPU, both LoRAs loaded
    inputs = make_inputs(seed)
    results = {}
    for name, case in CASES.items():
        with original.Recorder(pipe) as recorder:
            frames = _upstream_case(pipe, case, inputs, seed)
        results[name] = {"latents": recorder.final, "frames": torch.from_numpy(np.asarray(frames)),
                         "steps": recorder.steps}
    return results


# ---- comparison ----------------------------------------------------------------------------------------

def rel_l2(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Relative L2 and max abs of `a` against `b` (inf where not finite)."""
    from longcat_reference.metrics import compare_outputs

    found = compare_outputs(a, b)
    return tuple(math.inf if found[name] is None else found[name] for name in ("rel_l2", "max_abs"))


def compare(ours: dict, upstream: dict, tol: float) -> bool:
    passed = True
    print(f"{'case':<14} {'latents rel_l2':>15} {'max_abs':>10} {'worst step':>11} {'frames rel_l2':>14} "
          f"{'frames max':>10}  verdict")
    for name in CASES:
        mine, theirs = ours[name], upstream[name]
        if mine["latents"].shape != theirs["latents"].shape or len(mine["steps"]) != len(theirs["steps"]):
            print(f"{name:<14} shape/steps differ: {list(mine['latents'].shape)} vs {list(theirs['latents'].shape)}, "
                  f"{len(mine['steps'])} vs {len(theirs['steps'])} steps  FAIL")
            passed = False
            continue
        rel, max_abs = rel_l2(mine["latents"], theirs["latents"])
        worst = max(rel_l2(a, b)[0] for a, b in zip(mine["steps"], theirs["steps"], strict=True))
        frames, frames_max_abs = rel_l2(mine["frames"], theirs["frames"])
        # Frames that went through uint8 between segments (the long video) differ by whole levels wherever a
        # value sits near a rounding edge; for them the bound is one level, not a rel L2 (the latents carry the
        # strict check). Other frames are compared in float.
        frames_ok = frames_max_abs <= UINT8_LEVEL if name in UINT8_FRAMES else frames <= tol
        ok = rel <= tol and worst <= tol and frames_ok
        passed &= ok
        print(f"{name:<14} {rel:>15.3e} {max_abs:>10.2e} {worst:>11.3e} {frames:>14.3e} {frames_max_abs:>10.2e}  "
              f"{'ok' if ok else 'FAIL'}   ({len(mine['steps'])} steps, latents {list(mine['latents'].shape)})")
    print("PASS" if passed else "FAIL")
    return passed


def _select(prompt: str, cases: list[str] | None) -> None:
    """Both processes run the same prompt and cases: the module constants every case reads."""
    global PROMPT
    PROMPT = prompt
    for name in list(CASES):
        if cases and name not in cases:
            del CASES[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", nargs="?", type=Path, help="raw tiny tree (built in --work when omitted)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/longcat-task-check"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4, help="rel L2 tolerance (fp32)")
    parser.add_argument("--upstream-python", type=Path, default=DEFAULT_UPSTREAM_PYTHON)
    parser.add_argument("--original-src", type=Path, default=DEFAULT_CHECKOUT,
                        help="the upstream LongCat-Video checkout (holds longcat_video/)")
    parser.add_argument("--prompt", help="the prompt of every case (default: task parity's), e.g. one of "
                                         "upstream's demo prompts with non-ASCII text")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="run only these cases")
    parser.add_argument("--upstream", metavar="OUT", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--lora-ranks", default="{}", help=argparse.SUPPRESS)  # JSON, computed by our side
    args = parser.parse_args(argv)
    if args.prompt is None:  # the upstream process is always given --prompt
        from longcat_reference.pipeline.task_parity import PROMPT as parity_prompt

        args.prompt = parity_prompt
    _select(args.prompt, args.cases)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    if args.upstream:
        torch.save(run_upstream(args.tree, args.seed, args.original_src, json.loads(args.lora_ranks)), args.upstream)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    tree = args.tree
    if tree is None:
        from longcat_convert.tiny_tree import build_tiny_tree

        tree = build_tiny_tree(args.work / "tiny", overwrite=True)
    if not (tree / "dit").is_dir():
        print(f"error: {tree} is not a raw tree (no dit/)", file=sys.stderr)
        return 2
    ours = run_ours(tree, args.seed)
    out = args.work / "upstream.pt"
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    from longcat_reference.loading import open_tree, upstream_lora_ranks

    ranks = json.dumps(upstream_lora_ranks(open_tree(tree)))  # the upstream process does not parse LoRAs itself
    command = [str(args.upstream_python), __file__, str(tree), "--seed", str(args.seed), "--original-src",
               str(args.original_src), "--prompt", args.prompt, "--lora-ranks", ranks, "--upstream", str(out)]
    command += ["--cases", *args.cases] if args.cases else []
    if subprocess.run(command, env=env).returncode != 0:
        print("error: the upstream run failed (see above)", file=sys.stderr)
        return 2
    upstream = torch.load(out, weights_only=False)
    (args.work / "cases.json").write_text(json.dumps(CASES, indent=2) + "\n")
    return 0 if compare(ours, upstream, args.tol) else 1


if __name__ == "__main__":
    sys.exit(main())
