"""convert = read → plan → execute → report. The CLI and the Python API both come through here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LongcatError
from .execute import execute
from .hub import resolve_source
from .plan import ConversionPlan, DtypePolicy, PlanOptions, plan_conversion
from .sharding import parse_size
from .tree import Tree, read_tree


@dataclass(frozen=True)
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


def _check_paths(src: Path, dst: Path) -> None:
    real_src, real_dst = Path(os.path.realpath(src)), Path(os.path.realpath(dst))
    if real_src == real_dst:
        raise LongcatError("the destination is the source", dst, "write the converted tree to a new folder")
    if real_dst.is_relative_to(real_src):
        raise LongcatError("the destination is inside the source tree", dst, "write it outside the source folder")
    if real_src.is_relative_to(real_dst):
        raise LongcatError("the source is inside the destination, which --overwrite would delete", dst,
                           "choose another destination")


def prepare(request: ConvertRequest) -> tuple[Tree, ConversionPlan]:
    """Read and plan; no byte is written."""
    src = resolve_source(request.src)
    _check_paths(src, request.dst)
    tree = read_tree(src, follow_symlinks=request.follow_symlinks)
    if tree.layout == request.to and request.dtype == "keep" and not request.keep_fp32:
        raise LongcatError(f"is already in the {request.to} layout and no dtype change was asked for", src,
                           "choose another --to, or a --dtype to re-cast")
    options = PlanOptions(request.to, DtypePolicy.from_options(request.dtype, request.keep_fp32),
                          parse_size(request.max_shard_size), request.lora_alpha_fix)
    return tree, plan_conversion(tree, options)


def convert(request: ConvertRequest) -> dict:
    tree, plan = prepare(request)
    with tree.sources:  # the source files stay open from reading to commit: the bytes converted are those planned
        return execute(plan, tree, request.dst, overwrite=request.overwrite, quiet=request.quiet,
                       resume=request.resume)
