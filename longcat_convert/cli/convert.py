"""`longcat-convert convert`: the streaming, verified converter."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import click

from ..conversion import ConvertRequest, convert, prepare
from ..core import progress
from ..core.text_format import census_lines, human_bytes
from ..execute import LINK_METHODS
from ..hub import looks_like_repo_id
from ..plan import ConversionPlan
from .common import dtype_option, echo_json, json_option, quiet_option, report_option
from .report_file import check_report_path, write_report


def _plan_lines(plan: ConversionPlan) -> list[str]:
    lines = [f"plan: {plan.source_layout} -> {plan.target_layout}",
             f"  DiT: {sum(len(s.tensors) for s in plan.dit_shards)} tensors in {len(plan.dit_shards)} shard(s)"
             + (f" + {plan.indexes[0].file}" if plan.indexes else "")]
    lines += [f"    {s.file}  {len(s.tensors)} tensors  {human_bytes(s.nbytes)}" for s in plan.dit_shards[:8]]
    if len(plan.dit_shards) > 8:
        lines.append(f"    … and {len(plan.dit_shards) - 8} more shards")
    for adapter in plan.adapters:
        lines.append(f"  LoRA {adapter.name}: {adapter.source_file} ({adapter.source_format}) -> {adapter.target_file} "
                     f"({adapter.target_format}), {adapter.modules} modules, {len(adapter.shard.tensors)} tensors")
        lines += [f"    note: {note}" for note in adapter.notes[:5]]
    for drop in plan.drops[:5]:
        lines.append(f"  drop {drop.key}: {drop.reason}")
    lines.append(f"  copied unchanged: {len(plan.copies)} files, {human_bytes(plan.copy_bytes)}")
    lines.append(f"  written: {', '.join(plan.json_files)}")
    lines += _skipped_lines([{"path": k.path, "reason": k.reason} for k in plan.skipped])
    lines.append(f"  dtype policy: {plan.policy.describe()['dtype']}"
                 + (f", float32 kept for {', '.join(plan.policy.keep_fp32)}" if plan.policy.keep_fp32 else ""))
    lines.append("  dtype census (before -> after):")
    lines += census_lines(plan.census_before, plan.census_after)
    lines.append(f"  estimated working memory: {human_bytes(plan.working_memory_bytes())} beyond the interpreter "
                 f"(largest tensor {human_bytes(plan.largest_tensor_bytes())} is streamed, never held whole)")
    lines.append(f"  estimated disk: {human_bytes(plan.tensor_bytes + plan.copy_bytes)}")
    return lines


@click.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(["fastvideo", "diffusers", "raw"]), required=True,
              help="Target layout.")
@dtype_option(("keep", "float32", "bfloat16", "float16"), "dtype of the written DiT and LoRA tensors (never "
              "changed silently).", "keep")
@click.option("--keep-fp32", "keep_fp32", multiple=True, metavar="PATTERN",
              help="Glob on output tensor names kept in float32 whatever --dtype says, e.g. '*adaln*'. Repeatable.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest DiT shard, e.g. 5GB, 500MB, 2GiB.")
@click.option("--lora-alpha-fix", type=click.Choice(["refuse", "rescale"]), default="refuse", show_default=True,
              help="When alpha_scale·rank is not an integer, FastVideo's int(lora_alpha) would change the strength: "
                   "refuse, or rescale lora_B and set lora_alpha = rank (exact, reported).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new tree is complete).")
@click.option("--resume", is_flag=True,
              help="After an interrupted run (killed, power loss): reuse the output files its journal proves complete "
                   "(re-hashed), redo the rest. The result is byte-identical to an uninterrupted run.")
@click.option("--follow-symlinks", is_flag=True, help="Accept symlinks in SRC that point outside it.")
@click.option("--allow-mixed-dtypes", is_flag=True,
              help="Accept a source whose components mix dtypes (as `validate --allow-mixed-dtypes` does).")
@click.option("--link", type=click.Choice(LINK_METHODS), default="auto", show_default=True,
              help="How files carried over byte for byte (text encoder, VAE, tokenizer, scheduler...) are placed. "
                   "auto: a reflink (copy-on-write clone, ~0 s, either tree can later change alone) where the file "
                   "system supports it (btrfs, XFS, ...), else a copy. reflink: the same. hardlink: a second name "
                   "for the same file, ~0 s, only on one file system -- CAVEAT: the two trees then share those "
                   "files, so editing one in place edits the other. copy: always copy. Whatever cannot be linked is "
                   "copied; every file is hashed into conversion.json either way.")
@click.option("--from-int8", is_flag=True,
              help="LongCat-Video-Avatar 1.5: convert base_model_int8/ instead of base_model/, dequantised as "
                   "upstream's QuantizedLinear computes its weight in --dtype (float32 or bfloat16).")
@click.option("--to-int8", is_flag=True,
              help="LongCat-Video-Avatar 1.5 with --to raw: write the DiT as base_model_int8/ in upstream's INT8 "
                   "format (bitwise what its quantizer writes), in place of base_model/.")
@click.option("--dry-run", is_flag=True, help="Print the plan (outputs, shards, dtypes, memory, disk); write nothing.")
@report_option("the manifest (with --dry-run: the plan)")
@json_option("the manifest (with --dry-run: the plan)")
@quiet_option("Also no summary.")
def convert_command(src: str, dst: Path, to: str, dtype: str, keep_fp32: tuple[str, ...], max_shard_size: str,
                    lora_alpha_fix: str, overwrite: bool, resume: bool, follow_symlinks: bool, allow_mixed_dtypes: bool,
                    link: str, from_int8: bool, to_int8: bool, dry_run: bool, report_path: Path | None,
                    as_json: bool, quiet: bool) -> None:
    """Convert the LongCat-Video tree SRC into a new tree DST in another layout.

    SRC must pass `longcat-convert validate` (the same checks run first; the first errors are shown),
    and DST must pass it too before it is moved into place. Every source file is converted, copied,
    or left out with its reason (pickles, the source's git data), listed in the summary and manifest.

    SRC is a folder, or a Hugging Face repo id such as meituan-longcat/LongCat-Video (only the needed
    folders are downloaded; with HF_HUB_OFFLINE=1 the local cache is used). Anything that looks like a
    path (starting with ., / or ~, or whose parent folder exists) is a folder.

    Streams tensor bytes (memory stays near one chunk, whatever the model size), splits fused
    q/k/v and k/v projections for FastVideo (and joins them back for raw/diffusers), converts every
    LoRA module and proves its effective weight delta unchanged, and writes DST atomically with a
    conversion.json manifest holding the sha256 of every tensor and file.

    \b
    Examples:
      longcat-convert convert weights/LongCat-Video out/fv --to fastvideo
      longcat-convert convert meituan-longcat/LongCat-Video out/fv \\
          --to fastvideo --dtype bfloat16 --keep-fp32 '*adaln*'
      longcat-convert convert out/fv out/raw --to raw   # reverse: bit-identical
      longcat-convert convert weights/LongCat-Video out/d --to diffusers --dry-run
      longcat-convert convert weights/LongCat-Video-Avatar-1.5 out/av \\
          --to diffusers
      longcat-convert convert weights/LongCat-Video-Avatar-1.5 out/av8 \\
          --to diffusers --from-int8 --dtype bfloat16

    A LongCat-Video-Avatar tree (1.0: avatar_single/, avatar_multi/; 1.5:
    base_model/, base_model_int8/, lora/dmd_lora) takes the tokenizer, text
    encoder and VAE from the LongCat-Video tree beside it (../LongCat-Video,
    where upstream's demos read them); the converted tree holds them and
    stands alone (audio encoder in audio_encoder/, 1.0's multi-speaker DiT
    in transformer_multi/).
    """
    local_src = not looks_like_repo_id(src)
    report_target = None
    if report_path:
        outside = {"destination": dst, **({"source": Path(src)} if local_src else {})}
        report_target = check_report_path(report_path, not_inside=outside)
    request = ConvertRequest(src=src, dst=dst, to=to, dtype=dtype,
                             keep_fp32=keep_fp32, max_shard_size=max_shard_size, lora_alpha_fix=lora_alpha_fix,
                             overwrite=overwrite, follow_symlinks=follow_symlinks, quiet=quiet, resume=resume,
                             allow_mixed_dtypes=allow_mixed_dtypes, link=link, from_int8=from_int8,
                             to_int8=to_int8)
    if dry_run:
        _, plan = prepare(request)
        document = {"dry_run": True, "plan": plan.to_json()}
        if report_target:
            write_report(report_target, document, report_path)
        if as_json:
            echo_json(document)
        else:
            click.echo("\n".join(_plan_lines(plan)))
            click.echo("dry run: nothing was written")
        return
    started = time.perf_counter()
    with progress.reporting(progress.wanted(quiet)):
        manifest = convert(request)
    elapsed = time.perf_counter() - started
    if report_target:
        write_report(report_target, manifest, report_path)
    if as_json:
        echo_json(manifest)
    elif not quiet:
        click.echo("\n".join(_summary_lines(manifest, dst, elapsed)))


def _summary_lines(manifest: dict, dst: Path, elapsed: float) -> list[str]:
    tensor_bytes = sum(v["bytes"] for v in manifest["census"]["after"].values())
    placed = Counter(entry["how"] for entry in manifest["files"] if entry["how"] != "written")
    lines = [f"converted {manifest['source']['layout']} -> {manifest['target']['layout']}: {dst}",
             f"  {len(manifest['tensors'])} tensors, {len(manifest['files'])} other files "
             f"({', '.join(f'{count} {how}' for how, count in sorted(placed.items())) or 'none carried over'}), "
             f"{human_bytes(tensor_bytes)} of tensors in {elapsed:.1f} s",
             "  dtype census (before -> after):"]
    lines += census_lines(manifest["census"]["before"], manifest["census"]["after"])
    for check in manifest["lora_checks"]:
        lines.append(f"  LoRA {check['adapter']}: {check['modules']} modules, effective delta max rel error "
                     f"{check['max_rel_error']:.1e} -> {'OK' if check['passed'] else 'FAILED'}")
    lines += _skipped_lines(manifest.get("skipped", []))
    lines.append("  manifest: conversion.json (sha256 of every tensor and file)")
    return lines


def _skipped_lines(skipped: list[dict], shown: int = 5) -> list[str]:
    lines = [f"  not carried over: {entry['path']} ({entry['reason']})" for entry in skipped[:shown]]
    if len(skipped) > shown:
        lines.append(f"  … and {len(skipped) - shown} more not carried over (listed in conversion.json)")
    return lines
