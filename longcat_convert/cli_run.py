"""`longcat-convert run`: one LongCat-Video task from a checkpoint tree of any layout."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from .errors import LongcatError

TASKS = ("t2v", "i2v", "vc", "refine", "long")


@click.command("run")
@click.argument("tree", type=click.Path(path_type=Path))
@click.option("--task", type=click.Choice(TASKS), required=True,
              help="t2v text-to-video; i2v image-to-video (--image); vc video continuation (--video); refine "
                   "480p->720p refinement of --video; long t2v + --segments continuations + refinement.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="The .npz to write (frames, latents, timesteps, info); an .mp4 next to it if imageio-ffmpeg "
                   "is installed.")
@click.option("--prompt", default="", help="The text prompt (refine defaults to '' as the long-video demo).")
@click.option("--negative-prompt", help="Used only with guidance > 1 (default: '').")
@click.option("--distill", is_flag=True,
              help="t2v/i2v/vc: cfg_step_lora with the distilled schedule (default 16 steps, guidance 1).")
@click.option("--image", type=click.Path(path_type=Path), help="i2v: the first frame; refine: an image condition.")
@click.option("--video", type=click.Path(path_type=Path),
              help="vc: the video to continue; refine: the stage-1 video. A folder of frames, an animated image, "
                   "an .npz with 'frames' (e.g. an earlier run's output) or .npy; frames are used as given.")
@click.option("--cond-video", type=click.Path(path_type=Path), help="refine: a conditioning video.")
@click.option("--num-cond-frames", type=int,
              help="vc: conditioning frames (default 13); refine: frames of --image (1) / --cond-video.")
@click.option("--height", type=int, help="t2v/long: frame height (default 480). i2v/vc/refine: explicit size "
                                         "instead of the resolution bucket (tiny models).")
@click.option("--width", type=int, help="Frame width, as --height (t2v/long default 832).")
@click.option("--resolution", type=click.Choice(["480p", "720p"]), default="480p", show_default=True,
              help="i2v/vc: the bucket table when --height/--width are not given.")
@click.option("--num-frames", type=int, default=93, show_default=True,
              help="Output frames, rounded down to 4k+1 (vc: conditioning included; long: per segment).")
@click.option("--steps", type=int, help="Sampling steps (default 50, distilled 16; refine: before t_thresh cuts "
                                        "them, 50 -> 5).")
@click.option("--guidance", type=float, help="CFG-Zero* scale; CFG is on above 1 (default 4, distilled 1).")
@click.option("--seed", type=int, default=42, show_default=True, help="Seeds the generator every draw comes from.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="Compute dtype of every component (upstream: bfloat16; on a CPU float32 is much faster).")
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
def run_command(tree: Path, task: str, output: Path, **options) -> None:
    """Run TASK on the checkpoint TREE (raw, diffusers or fastvideo layout) and write the result.

    \b
    Examples (a tiny tree from `longcat-convert tiny /tmp/raw`):
      longcat-convert run /tmp/raw --task t2v --prompt "a cat" --height 32 --width 48 --num-frames 9 \\
          --steps 4 --max-sequence-length 32 --dtype float32 -o t2v.npz
      longcat-convert run /tmp/raw --task vc --video t2v.npz --num-cond-frames 5 --num-frames 13 \\
          --height 32 --width 48 --steps 4 --max-sequence-length 32 -o vc.npz
      longcat-convert run /tmp/raw --task refine --video t2v.npz --height 64 --width 64 --steps 50 -o hd.npz
      longcat-convert run weights/LongCat-Video --task t2v --prompt "..." --device cuda -o out.npz

    The .npz holds `frames` (float32 [T,H,W,3] in [0,1]; uint8 for long), `latents` (final normalized
    latents), `timesteps`, `info` (JSON) and with --save-steps `steps`. Same seed, same draws in the same
    order as upstream's demos (refinement's global-RNG draws come from a stream seeded with --seed).
    """
    from longcat_reference.pipeline import RandomStreams, load_pipeline

    _check_options(task, options)
    output = output if output.suffix == ".npz" else output.with_name(output.name + ".npz")
    pipe = load_pipeline(tree, options["dtype"], options["device"])
    rng = RandomStreams.from_seed(options["seed"], pipe.device)
    arrays, info, fps = _run(task, pipe, rng, options)
    from longcat_reference.pipeline.media import mp4_writer_available, write_mp4, write_npz

    write_npz(output, arrays, info)
    frames = arrays["frames"]
    click.echo(f"{task}: {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]}, {info.get('steps', '?')} "
               f"steps -> {output}")
    if mp4_writer_available():
        write_mp4(output.with_suffix(".mp4"), frames, fps)
        click.echo(f"video: {output.with_suffix('.mp4')} ({fps} fps)")
    else:
        click.echo("no .mp4 written: imageio-ffmpeg is not installed (pip install imageio-ffmpeg)")


def _check_options(task: str, options: dict) -> None:
    needs = {"i2v": "image", "vc": "video", "refine": "video"}
    if task in needs and options[needs[task]] is None:
        raise LongcatError(f"--task {task} needs --{needs[task]}")
    if options["distill"] and task in ("refine", "long"):
        raise LongcatError(f"--distill applies to t2v, i2v and vc, not {task}")
    if (options["height"] is None) != (options["width"] is None):
        raise LongcatError("give both --height and --width, or neither")
    if (options["refine_height"] is None) != (options["refine_width"] is None):
        raise LongcatError("give both --refine-height and --refine-width, or neither")
    if options["image"] is not None and options["cond_video"] is not None:
        raise LongcatError("refine takes --image or --cond-video as conditioning, not both")


def _or(value, default):
    return default if value is None else value


def _size(options: dict) -> tuple[int, int] | None:
    return None if options["height"] is None else (options["height"], options["width"])


def _run(task: str, pipe, rng, options: dict) -> tuple[dict[str, np.ndarray], dict, int]:
    from longcat_reference.pipeline import image_to_video, text_to_video, video_continuation
    from longcat_reference.pipeline.media import load_image, load_video

    common = {"steps": options["steps"], "guidance": options["guidance"], "distill": options["distill"],
              "negative_prompt": options["negative_prompt"], "num_frames": options["num_frames"],
              "max_sequence_length": options["max_sequence_length"]}
    prompt = options["prompt"]
    if task == "t2v":
        height, width = _size(options) or (480, 832)
        result = text_to_video(pipe, prompt, rng, height=height, width=width, **common)
    elif task == "i2v":
        result = image_to_video(pipe, load_image(options["image"]), prompt, rng, resolution=options["resolution"],
                                size=_size(options), **common)
    elif task == "vc":
        result = video_continuation(pipe, load_video(options["video"]), prompt, rng,
                                    resolution=options["resolution"], size=_size(options),
                                    num_cond_frames=_or(options["num_cond_frames"], 13),
                                    use_kv_cache=not options["no_kv_cache"],
                                    enhance_hf_schedule=False if options["no_enhance_hf"] else None, **common)
    elif task == "refine":
        return _refine(pipe, rng, options, load_image, load_video)
    else:
        return _long(pipe, rng, options)
    return _single(result, options), result.info, 15


def _single(result, options: dict) -> dict[str, np.ndarray]:
    arrays = {"frames": result.frames, "latents": result.latents.float().numpy(),
              "timesteps": np.asarray(result.timesteps, dtype=np.float32)}
    if options["save_steps"]:
        arrays["steps"] = np.stack([step.numpy() for step in result.steps])
    return arrays


def _refine(pipe, rng, options: dict, load_image, load_video) -> tuple[dict[str, np.ndarray], dict, int]:
    from longcat_reference.pipeline import refine

    image = load_image(options["image"]) if options["image"] is not None else None
    condition = load_video(options["cond_video"]) if options["cond_video"] is not None else None
    count = options["num_cond_frames"]
    if count is None:
        count = 1 if image is not None else (len(condition) if condition is not None else 0)
    result = refine(pipe, load_video(options["video"]), rng, prompt=options["prompt"], image=image, video=condition,
                    num_cond_frames=count, size=_size(options), steps=_or(options["steps"], 50),
                    t_thresh=options["t_thresh"], spatial_refine_only=options["spatial_refine_only"],
                    bsa=not options["no_bsa"], max_sequence_length=options["max_sequence_length"])
    return _single(result, options), result.info, 15 if options["spatial_refine_only"] else 30


def _long(pipe, rng, options: dict) -> tuple[dict[str, np.ndarray], dict, int]:
    from longcat_reference.pipeline import long_video

    size = _size(options)
    refine_size = None if options["refine_height"] is None else (options["refine_height"], options["refine_width"])
    height, width = size or (480, 832)
    result = long_video(pipe, options["prompt"], rng, negative_prompt=options["negative_prompt"],
                        segments=options["segments"], height=height, width=width, num_frames=options["num_frames"],
                        num_cond_frames=_or(options["num_cond_frames"], 13), steps=_or(options["steps"], 50),
                        guidance=_or(options["guidance"], 4.0), vc_size=size,
                        refine_stage=not options["no_refine"], refine_size=refine_size,
                        refine_steps=_or(options["steps"], 50), spatial_refine_only=options["spatial_refine_only"],
                        bsa=not options["no_bsa"], max_sequence_length=options["max_sequence_length"])
    frames = result.refined_frames if result.refined_frames is not None else result.stage1_frames
    arrays = {"frames": frames, "stage1_frames": result.stage1_frames}
    for index, segment in enumerate(result.segments):
        arrays[f"latents_{index:03d}_{segment.task}"] = segment.latents.float().numpy()
    info = {"segments": [segment.info for segment in result.segments], "steps": _or(options["steps"], 50)}
    refined = result.refined_frames is not None and not options["spatial_refine_only"]
    return arrays, info, 30 if refined else 15
