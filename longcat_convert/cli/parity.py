"""`longcat-convert parity`: prove a converted tree equal to its source, tensor by tensor or forward."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import click

from ..core import progress
from ..core.errors import LongcatError
from ..sharding import parse_size
from .common import dtype_option, echo_json, json_option, quiet_option, report_option
from .report_file import check_report_path, write_report


def _case_line(case: dict, width: int = 24) -> str:
    verdict = "PASS" if case["passed"] else "FAIL"
    if "rel_l2" in case:
        return (f"  {case['name']:<{width}} max_abs {case['max_abs']:.2e}  rel_l2 {case['rel_l2']:.2e}  "
                f"cosine {case['cosine']:.8f}  {verdict}")
    counts = ", ".join(f"{k} {case[k]}" for k in ("checked", "exact", "equal_after_cast", "mismatched", "modules")
                       if k in case)
    problem = case.get("error") or (f"e.g. {case['mismatches'][0]}" if case.get("mismatches") else "")
    return f"  {case['name']:<{width}} {verdict}  {counts}  {problem}".rstrip()


@click.command("parity")
@click.argument("raw", type=click.Path(path_type=Path))
@click.argument("converted", type=click.Path(path_type=Path))
@click.option("--level", type=click.Choice(["weights", "forward", "task"]), default="weights", show_default=True,
              help="weights: every converted tensor has the dtype the conversion's dtype policy gives it and equals "
                   "its source slices (cast only where the policy asked), and every LoRA delta matches; "
                   "forward: the same seeded inputs through both models, per case errors; "
                   "task: every pipeline task from both trees, per-step latents and decoded frames.")
@dtype_option(("float32", "bfloat16"), "Forward and task levels: compute dtype, default float32 (forward thresholds: "
              "float32 rel L2 <= 1e-5, bfloat16 <= 2e-2; task: 1e-4, 5e-2). Weights level: only for a CONVERTED "
              "tree without conversion.json, the dtype it was cast to (by default every tensor must keep its source "
              "dtype; with a manifest, its dtype policy decides).")
@click.option("--threshold", type=float, help="Forward and task levels: override the rel L2 threshold for --dtype.")
@click.option("--cases", multiple=True, help="Forward level: plain, cond, kvcache, lora, lora:<name> (default all); "
              "for an avatar tree at2v, ai2v, multi, vc, vc-kv, lora, lora:<name>, run on every DiT folder "
              "(1.0: avatar_single and avatar_multi), LoRAs on the main one.")
@click.option("--from-int8", "from_int8", is_flag=True,
              help="CONVERTED was made with convert --from-int8 (LongCat-Video-Avatar 1.5): compare it with RAW's "
                   "base_model_int8/ instead of base_model/. Weights: every tensor equals upstream's dequantisation "
                   "of the INT8 rows (int8 x scale in the converted dtype), bit for bit; forward: the INT8 folder "
                   "is loaded as INT8 and computes in --dtype (use --dtype float32 for a float32 conversion).")
@click.option("--stream", is_flag=True,
              help="Forward level: walk both trees block by block (one block of each in memory, whatever the depth) "
                   "and report every block's error and the first block where they diverge. Chosen by itself when "
                   "the whole model does not fit --max-memory.")
@click.option("--max-memory", metavar="SIZE",
              help="Forward level: memory budget, e.g. 4GB (default: the device's free memory now). A model larger "
                   "than this is compared streamed.")
@click.option("--tokens", type=int, help="Forward level: about this many latent tokens per sample (4 latent frames, a "
              "near-square grid). Default 24: fast at full width on a CPU.")
@click.option("--frames", type=int, help="Forward level: latent frames of the inputs (default 4, at least 3).")
@click.option("--height", type=int, help="Forward level: latent height (a multiple of the patch; default 2 patches).")
@click.option("--width", type=int, help="Forward level: latent width (a multiple of the patch; default 3 patches).")
@click.option("--device", default="cpu", show_default=True, help="Forward level: cpu, cuda or cuda:N.")
@click.option("--tasks", multiple=True,
              help="Task level: t2v, t2v-distill, i2v, vc, vc-nokv, refine, long (default all). Repeatable.")
@click.option("--steps", default=3, show_default=True, help="Task level: sampling steps per task.")
@click.option("--original-src", type=click.Path(path_type=Path),
              help="Task level: a LongCat-Video checkout (the folder holding longcat_video/); the RAW side is run by "
                   "its own upstream pipeline (CPU/SDPA shims on CPU or without flash-attn) instead of ours. Needs "
                   "upstream's dependencies: pip install -r PATH/requirements.txt.")
@report_option("the report (schemas/parity-report.schema.json)")
@json_option("the report")
@quiet_option()
def parity_command(raw: Path, converted: Path, level: str, dtype: str | None, threshold: float | None,
                   cases: tuple[str, ...], from_int8: bool, stream: bool, max_memory: str | None, tokens: int | None,
                   frames: int | None, height: int | None, width: int | None, device: str,
                   tasks: tuple[str, ...], steps: int, original_src: Path | None,
                   report_path: Path | None, as_json: bool, quiet: bool) -> None:
    """Compare CONVERTED against its source RAW (raw or diffusers layout); exit 1 on any miss.

    \b
    Examples:
      longcat-convert parity weights/LongCat-Video out/fv
      longcat-convert parity /tmp/raw /tmp/fv --level forward --dtype bfloat16 \\
          --report parity.json
      longcat-convert parity full/raw full/fv --level forward --dtype bfloat16 \\
          --max-memory 4GB --tokens 96      # streamed when the model is larger
      longcat-convert parity /tmp/raw /tmp/fv --level task --tasks t2v --tasks vc
      longcat-convert parity /tmp/raw /tmp/fv --level task \\
          --original-src ~/src/LongCat-Video
      longcat-convert parity LongCat-Video-Avatar-1.5 out/av --level forward
      longcat-convert parity LongCat-Video-Avatar-1.5 out/av-from-int8 \\
          --level forward --from-int8 --dtype float32

    Avatar trees (LongCat-Video-Avatar 1.0 / 1.5; RAW raw or diffusers): weights covers every DiT folder
    (1.0: transformer and transformer_multi) and lora/dmd_lora, and a --to-int8 tree against upstream's
    quantisation; forward runs the avatar cases (at2v, ai2v, multi-speaker, continuation with and without KV
    cache) through every DiT folder and, on the main DiT, under each LoRA (upstream format at run time on RAW,
    the converted file on CONVERTED). No --stream for avatar trees.
    """
    if from_int8 and level == "task":
        raise LongcatError("--from-int8 works with --level weights or forward, not --level task")
    if original_src is not None and level != "task":
        raise LongcatError(f"--original-src works with --level task only, not --level {level}")
    report_target = check_report_path(report_path) if report_path else None
    if steps < 1:
        raise LongcatError(f"--steps must be at least 1, got {steps}")
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise LongcatError(f"--threshold must be a positive number, got {threshold}")
    forward = ForwardOptions(stream, parse_size(max_memory) if max_memory else None,
                             _grid(tokens, frames, height, width), device)
    if level != "forward" and forward.given():
        raise LongcatError(f"--stream, --max-memory, --tokens, --frames, --height, --width and --device work with "
                           f"--level forward only, not --level {level}")
    with progress.reporting(progress.wanted(quiet)):
        report, lines = _run_level(raw, converted, level, dtype, threshold, cases, forward, tasks, steps,
                                   original_src, from_int8)
    width = max([24, *(len(case["name"]) for case in report["cases"])])
    lines += [_case_line(case, width) for case in report["cases"]]
    if report_target:
        write_report(report_target, report, report_path)
    if as_json:
        echo_json(report)
    else:
        click.echo("\n".join(lines))
        click.echo(f"parity {level}: {'PASS' if report['passed'] else 'FAIL'}")
    raise SystemExit(0 if report["passed"] else 1)


@dataclass(frozen=True)
class ForwardOptions:
    stream: bool
    max_memory: int | None
    grid: tuple[int | None, ...]  # tokens, frames, height, width as given
    device: str

    def given(self) -> bool:
        return self.stream or self.max_memory is not None or any(v is not None for v in self.grid) or \
            self.device != "cpu"


def _grid(tokens: int | None, frames: int | None, height: int | None, width: int | None) -> tuple[int | None, ...]:
    if tokens is not None and (height is not None or width is not None):
        raise LongcatError("give either --tokens or --height/--width, not both")
    for name, value in (("--tokens", tokens), ("--frames", frames), ("--height", height), ("--width", width)):
        if value is not None and value <= 0:
            raise LongcatError(f"{name} must be positive, got {value}")
    return tokens, frames, height, width


def _latent_grid(forward: ForwardOptions):
    from longcat_reference.forward_parity import LatentGrid

    tokens, frames, height, width = forward.grid
    return LatentGrid(frames or 4, height, width, tokens)


def _divergence_lines(report: dict) -> list[str]:
    stages = report.get("stages")
    if stages is None:
        return []
    first = report["first_divergence"]
    timing = report["timing"]
    lines = [f"streamed: {len(stages)} stages compared (embedders, {len(stages) - 2} blocks, final layer) in "
             f"{timing['wall_seconds']:.1f} s (reading {timing['read_seconds']:.1f} s, compute "
             f"{timing['compute_seconds']:.1f} s); " + (f"first divergence: {first}" if first else "no stage diverged")]
    for stage in stages:
        if not stage["passed"]:
            case, result = max(stage["cases"].items(), key=lambda item: item[1].get("rel_l2") or math.inf)
            value = result.get("rel_l2")
            detail = result.get("error") or (f"rel_l2 {value:.2e}" if value is not None else "not finite")
            lines.append(f"  {stage['stage']:<14} FAIL  worst case {case}: {detail}")
            if len(lines) > 6:
                lines.append("  ... (every stage is in --report / --json)")
                break
    return lines


def _avatar_forward_lines(report: dict) -> list[str]:
    folders = ", ".join(f"{pair['raw']} vs {pair['converted']}" for pair in report["dit_folders"])
    source = "; RAW's INT8 DiT loaded as INT8" if report["from_int8"] else ""
    return [f"forward, avatar {report['variant']} ({report['dtype']}; {folders}{source})",
            f"outputs (threshold rel L2 <= {report['threshold']:.0e}):"]


def _run_level(raw: Path, converted: Path, level: str, dtype: str | None, threshold: float | None,
               cases: tuple[str, ...], forward: ForwardOptions, tasks: tuple[str, ...], steps: int,
               original_src: Path | None, from_int8: bool) -> tuple[dict, list[str]]:
    from longcat_reference.dit_parity import weights_parity
    from longcat_reference.forward_parity import forward_parity

    if level == "weights":
        report = weights_parity(raw, converted, dtype=dtype, from_int8=from_int8)
        policy = report["dtype_policy"]
        lines = ["weights: every converted tensor against its source slices, every LoRA delta; dtypes as "
                 f"{policy['origin']} (dtype {policy['dtype']}"
                 + (f", float32 kept for {', '.join(policy['keep_fp32'])})" if policy["keep_fp32"] else ")") + ":"]
    elif level == "forward":
        dtype = dtype or "float32"
        grid = _latent_grid(forward) if any(v is not None for v in forward.grid) else None
        report = forward_parity(raw, converted, cases=list(cases) or None, dtype=dtype,
                                thresholds={dtype: threshold} if threshold is not None else None,
                                device=forward.device, stream=forward.stream, max_memory=forward.max_memory,
                                grid=grid, from_int8=from_int8)
        if report.get("model") == "avatar":
            return report, _avatar_forward_lines(report)
        memory = report["memory"]
        lines = [f"forward ({report['dtype']}, {report['tokens']} latent tokens per sample, {memory['mode']}: "
                 f"{memory['reason']})", *_divergence_lines(report),
                 f"outputs (threshold rel L2 <= {report['threshold']:.0e}):"]
    else:
        from longcat_reference.pipeline.task_parity import TASKS, task_parity

        dtype = dtype or "float32"
        report = task_parity(raw, converted, tasks=list(tasks) or TASKS, steps=steps, dtype=dtype,
                             thresholds={dtype: threshold} if threshold is not None else None,
                             original_src=original_src)
        against = f"; raw side: upstream pipeline from {original_src}" if original_src is not None else ""
        lines = [f"task ({dtype}, {steps} steps; per-step latents and decoded frames{against}):"]
    return report, lines
