"""convert = read → plan → execute → report. The CLI and the Python API both come through here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import DestinationClaim, check_destination
from .core import keymap
from .core.dtypes import DtypePolicy
from .core.errors import LongcatError
from .core.io import SourceFiles
from .core.tree import Tree, read_tree
from .execute import execute
from .hub import looks_like_repo_id, resolve_source
from .plan import ConversionPlan, PlanOptions, plan_conversion
from .sharding import parse_size
from .validation.run import ValidateOptions, refuse_if_invalid, validate_tree


@dataclass(frozen=True, kw_only=True)
class ConvertRequest:
    src: Path | str  # a folder or a Hugging Face repo id
    dst: Path
    to: str
    dtype: str = "keep"
    keep_fp32: tuple[str, ...] = ()
    max_shard_size: str = "5GB"
    lora_alpha_fix: str = "refuse"
    overwrite: bool = False
    follow_symlinks: bool = False
    quiet: bool = False
    resume: bool = False
    allow_mixed_dtypes: bool = False
    link: str = "auto"  # how byte-identical files are placed: auto, reflink, hardlink, copy (see execute)
    from_int8: bool = False  # convert an avatar 1.5 tree's base_model_int8/ (dequantised to `dtype`)
    to_int8: bool = False  # write the DiT as upstream's INT8 base_model_int8/ (avatar 1.5, --to raw)


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse, before any work, a destination this run cannot own or that overlaps the source."""
    check_destination(dst, overwrite)
    real_src, real_dst = Path(os.path.realpath(src)), Path(os.path.realpath(dst))
    if real_src == real_dst:
        raise LongcatError("the destination is the source", dst, "write the converted tree to a new folder")
    if real_dst.is_relative_to(real_src):
        raise LongcatError("the destination is inside the source tree", dst, "write it outside the source folder")
    if real_src.is_relative_to(real_dst):
        raise LongcatError("the source is inside the destination, which --overwrite would delete", dst,
                           "choose another destination")


def prepare(request: ConvertRequest) -> tuple[Tree, ConversionPlan]:
    """Validate, read and plan; no byte is written."""
    return _plan(request, _checked_source(request))


def _checked_source(request: ConvertRequest) -> Path:
    src = resolve_source(request.src)
    _check_paths(src, request.dst, request.overwrite)
    return src


def _plan(request: ConvertRequest, src: Path) -> tuple[Tree, ConversionPlan]:
    # a hub snapshot's files are symlinks into the cache's blob store, outside the snapshot folder
    from_hub = isinstance(request.src, str) and looks_like_repo_id(request.src)  # as resolve_source decides
    follow_symlinks = request.follow_symlinks or from_hub
    # One root and one set of held files for validating and reading: the files read are those validated, and
    # `execute` proves them unchanged before committing.
    root, sources = Path(os.path.realpath(src)), SourceFiles()
    report = validate_tree(root, ValidateOptions(follow_symlinks=follow_symlinks,
                                                 allow_mixed_dtypes=request.allow_mixed_dtypes), sources)
    refuse_if_invalid(report, src, f"`longcat-convert validate {src}` lists every problem; "
                      "a tree it rejects is not converted")
    tree = read_tree(root, follow_symlinks=follow_symlinks, sources=sources, int8=request.from_int8)
    target = _target_layout(tree, request.to)
    if tree.layout == target and request.dtype == "keep" and not request.keep_fp32 and not request.to_int8:
        raise LongcatError(f"is already in the {request.to} layout and no dtype change was asked for", src,
                           "choose another --to, or a --dtype to re-cast")
    options = PlanOptions(target, DtypePolicy.from_options(request.dtype, request.keep_fp32),
                          parse_size(request.max_shard_size), request.lora_alpha_fix, request.to_int8)
    return tree, plan_conversion(tree, options)


def _target_layout(tree: Tree, to: str) -> str:
    """`--to raw|diffusers|fastvideo` for this tree's family: an avatar tree goes to the avatar layouts (raw: the
    published layout of its version)."""
    if tree.avatar_variant is None:
        return to
    return keymap.avatar_target_layout(to) or keymap.avatar_spec()["variants"][tree.avatar_variant]["raw_layout"]


def convert(request: ConvertRequest) -> dict:
    """DST is claimed (locked, what --overwrite may replace recorded) before planning, held to the end; the
    source files stay open from reading to commit, so the bytes converted are those planned."""
    src = _checked_source(request)
    with DestinationClaim(request.dst, request.overwrite) as claim:
        tree, plan = _plan(request, src)
        with tree.sources:
            return execute(plan, tree, request.dst, overwrite=request.overwrite, quiet=request.quiet,
                           resume=request.resume, claim=claim, link=request.link)
