"""`longcat-convert run`: one LongCat-Video task from a checkpoint tree of any layout.

Order of work: check every option, read the input media, plan (sizes after bucketing, frames after
rounding, the real step count, a rough cost; see longcat_reference.pipeline.preflight), print one line
saying what will run, and only then load the models.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from .. import __version__
from ..core import progress
from ..core.errors import LongcatError
from .common import dtype_option, quiet_option

if TYPE_CHECKING:
    from longcat_reference.pipeline.dispatch import TaskRun
    from longcat_reference.pipeline.preflight import Media, RunPlan

TASKS = ("t2v", "i2v", "vc", "refine", "long")


@click.command("run")
@click.argument("tree", type=click.Path(path_type=Path))
@click.option("--task", type=click.Choice(TASKS), required=True,
              help="t2v text-to-video; i2v image-to-video (--image); vc video continuation (--video); refine "
                   "480p->720p refinement of --video; long t2v + --segments continuations + refinement.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, metavar="PATH",
              help="The .npz to write (frames, latents, timesteps, info); an .mp4 next to it if imageio-ffmpeg "
                   "is installed.")
@click.option("--prompt", default="", help="The text prompt (refine defaults to '' as the long-video demo).")
@click.option("--negative-prompt", help="Used only with guidance > 1 (default: '').")
@click.option("--distill", is_flag=True,
              help="t2v/i2v/vc: cfg_step_lora with the distilled schedule (default 16 steps, guidance 1).")
@click.option("--image", type=click.Path(path_type=Path), metavar="PATH",
              help="i2v: the first frame; refine: an image condition.")
@click.option("--video", type=click.Path(path_type=Path), metavar="PATH",
              help="vc: the video to continue; refine: the stage-1 video. A folder of frames, an animated image, "
                   "an .npz with 'frames' (e.g. an earlier run's output) or .npy; frames are used as given.")
@click.option("--cond-video", type=click.Path(path_type=Path), metavar="PATH", help="refine: a conditioning video.")
@click.option("--num-cond-frames", type=int,
              help="vc/long: conditioning frames (default 13); refine: frames of --image (1) / --cond-video.")
@click.option("--height", type=int, help="t2v/long: frame height (default 480). i2v/vc/refine: explicit size "
                                         "instead of the resolution bucket (tiny models).")
@click.option("--width", type=int, help="Frame width, as --height (t2v/long default 832).")
@click.option("--resolution", type=click.Choice(["480p", "720p"]), default="480p", show_default=True,
              help="i2v/vc: the bucket table when --height/--width are not given.")
@click.option("--num-frames", type=int, default=93, show_default=True,
              help="Output frames, 4k+1 (others are rounded down, with a note); vc: conditioning included; "
                   "long: per segment.")
@click.option("--steps", type=int, help="Sampling steps (default 50, distilled 16). vc runs enhance_hf's schedule: "
                                        "the steps above t=500 plus 10 more; refine: t_thresh cuts them, 50 -> 5.")
@click.option("--guidance", type=float, help="CFG-Zero* scale; CFG is on above 1 (default 4, distilled 1).")
@click.option("--seed", type=int, default=42, show_default=True, help="Seeds the generator every draw comes from.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@dtype_option(("float32", "bfloat16"), "Compute dtype of every component [default: float32 on CPU, exact and "
              "fast on every CPU (bfloat16 is fast only where the CPU has native bf16, e.g. AMX); bfloat16 on "
              "CUDA, as upstream].")
@click.option("--max-sequence-length", type=int, default=512, show_default=True,
              help="Text tokens (upstream 512; smaller is faster on tiny models).")
@click.option("--no-kv-cache", is_flag=True, help="vc: recompute the conditioning every step.")
@click.option("--no-enhance-hf", is_flag=True, help="vc: keep the plain schedule (no 500..50 uniform tail).")
@click.option("--t-thresh", type=float, default=0.5, show_default=True, help="refine: start noise level.")
@click.option("--spatial-refine-only", is_flag=True, help="refine/long: keep the frame count (no 2x in time).")
@click.option("--no-bsa", is_flag=True, help="refine/long: dense attention instead of block-sparse.")
@click.option("--segments", type=int, default=11, show_default=True, help="long: number of continuations.")
@click.option("--no-refine", is_flag=True, help="long: stop after stage 1.")
@click.option("--refine-height", type=int, help="long: explicit refinement size (default: the 720p bucket).")
@click.option("--refine-width", type=int, help="long: explicit refinement size (default: the 720p bucket).")
@click.option("--save-steps", is_flag=True, help="Also store the latents after every step (large for real sizes).")
@click.option("--yes", is_flag=True, help="Run even when the estimate calls a CPU run absurd (over an hour, or more "
                                          "memory than the machine has).")
@quiet_option("Also no plan line (notes about adjusted values still print).")
def run_command(tree: Path, task: str, output: Path, image: Path | None, video: Path | None,
                cond_video: Path | None, save_steps: bool, yes: bool, quiet: bool, **options) -> None:
    """Run TASK on the checkpoint TREE (raw, diffusers or fastvideo layout) and write the result.

    Every option and the input media are checked first; then one line says what will run (size after
    bucketing, frames, the steps the schedule really has and why, dtype, device, and a rough time and
    memory estimate when they are large), and only then do the models load. A CPU run estimated at
    over an hour, or at more memory than the machine has, is refused unless --yes.

    \b
    Examples (a tiny tree from `longcat-convert tiny /tmp/raw`):
      longcat-convert run /tmp/raw --task t2v --prompt "a cat" --height 32 \\
          --width 48 --num-frames 9 --steps 4 -o t2v.npz
      longcat-convert run /tmp/raw --task vc --video t2v.npz --num-frames 13 \\
          --num-cond-frames 5 --height 32 --width 48 --steps 4 -o vc.npz
      longcat-convert run /tmp/raw --task refine --video t2v.npz --height 64 \\
          --width 64 -o hd.npz
      longcat-convert run weights/LongCat-Video --task t2v --prompt "..." \\
          --device cuda -o out.npz

    The .npz holds `frames` (float32 [T,H,W,3] in [0,1]; uint8 for long), `latents` (final normalized
    latents), `timesteps`, `info` (JSON: what reproduces the output: task, prompts, seed, dtype, device,
    size, steps, guidance, the tree and its manifest's sha256, the tool version, every option) and with
    --save-steps `steps`. Same seed, same draws in the same order as upstream's demos (refinement's
    global-RNG draws come from a stream seeded with --seed).
    """
    from longcat_reference.pipeline.preflight import (
        REFUSE_FIX,
        RunRequest,
        check_request,
        plan_run,
        read_media,
        unused_media,
    )

    request = RunRequest(task=task, **options)
    notices = check_request(request)  # fails on bad options before any file is read
    output = _checked_output(output)
    notices += unused_media(task, image=image, video=video, cond_video=cond_video)
    media = read_media(task, image, video, cond_video)
    plan = plan_run(tree, request, media)
    plan.notices = notices
    for notice in notices:
        click.echo(f"note: {notice}", err=True)
    if not quiet:
        click.echo(plan.line(), err=True)
    refused = plan.refusal()
    if refused and not yes:
        raise LongcatError(f"this {task} run {refused}", fix=REFUSE_FIX)
    with progress.reporting(progress.wanted(quiet)):
        done = _execute(plan, media, save_steps)
    _write(output, done.arrays, _reproducible(done.info, plan, tree), done.fps)


def _checked_output(output: Path) -> Path:
    """-o as the .npz it will be (the suffix added when missing), refused when it cannot be written."""
    if output.is_dir() or output.name in ("", ".", ".."):
        raise LongcatError("is a folder; -o names the .npz file to write", output, "e.g. -o out.npz")
    output = output if output.suffix == ".npz" else output.with_name(output.name + ".npz")
    if output.is_dir():
        raise LongcatError("is a folder; -o names the .npz file to write", output, "e.g. -o out.npz")
    folder = next((p for p in (output.parent, *output.parent.parents) if p.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise LongcatError("cannot be written: its folder is not writable", output, "choose another -o path")
    return output


def _execute(plan: RunPlan, media: Media, save_steps: bool) -> TaskRun:
    from longcat_reference.pipeline import load_pipeline
    from longcat_reference.pipeline.dispatch import run_task

    with progress.scope(plan.request.task):
        return run_task(load_pipeline(plan.tree, plan.dtype, plan.device), plan, media, save_steps)


def _reproducible(info: dict, plan: RunPlan, tree: Path) -> dict:
    """The task's own info plus everything that reproduces the output."""
    from ..journal import file_sha256

    request = plan.request
    manifest = plan.tree.root / "conversion.json"
    return {**info, "task": request.task, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
            "seed": request.seed, "dtype": plan.dtype, "device": str(plan.device),
            "tree": {"path": str(Path(tree).resolve()), "layout": plan.tree.layout,
                     "manifest_sha256": file_sha256(manifest) if manifest.is_file() else None},
            "tool": {"name": "longcat-convert", "version": __version__},
            "options": dataclasses.asdict(request), "plan": plan.to_json()}


def _write(output: Path, arrays: dict[str, np.ndarray], info: dict, fps: int) -> None:
    from longcat_reference.pipeline.media import mp4_writer_available, write_mp4, write_npz

    write_npz(output, arrays, info)
    frames = arrays["frames"]
    click.echo(f"{info['task']}: {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]}, "
               f"{info.get('steps', '?')} steps -> {output}")
    if mp4_writer_available():
        write_mp4(output.with_suffix(".mp4"), frames, fps)
        click.echo(f"video: {output.with_suffix('.mp4')} ({fps} fps)")
    else:
        click.echo("no .mp4 written: imageio-ffmpeg is not installed (pip install imageio-ffmpeg)")
