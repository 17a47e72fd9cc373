"""Weight folders from headers only: the shared scanner's problems as findings, the expected key set, dtypes.

No tensor data is read here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..core import keymap
from ..core.dtypes import FLOATING, friendly
from ..core.errors import Problem
from ..core.io import SafetensorsHeader, TensorInfo
from ..core.shard_folder import FolderRules, ShardFolder, read_header_or_problem, scan_shard_folder
from .context import Context


def scan_weight_folder(ctx: Context, component: str, folder: Path, rules: FolderRules) -> ShardFolder:
    """The folder as the shared scanner reads it; each problem it finds becomes one finding."""
    weights = scan_shard_folder(folder, rules, ctx.files)
    report_problems(ctx, component, weights.problems)
    for name, header in weights.headers.items():
        ctx.headers[ctx.rel(folder / name)] = header
    return weights


def report_problems(ctx: Context, component: str, problems: list[Problem]) -> None:
    for problem in problems:
        ctx.findings.add(problem.severity, component, problem.kind, problem.message, ctx.rel(problem.path),
                         problem.key)


def read_header_or_report(ctx: Context, component: str, path: Path) -> SafetensorsHeader | None:
    problems: list[Problem] = []
    header = read_header_or_problem(path, ctx.files, problems)
    report_problems(ctx, component, problems)
    return header


def weights_summary(ctx: Context, weights: ShardFolder) -> dict:
    infos = [info for _, info in weights.located.values()]
    return {"path": ctx.rel(weights.folder), "files": sorted(weights.headers),
            "index": weights.index.path.name if weights.index else None, "tensors": len(infos),
            "bytes": sum(info.nbytes for info in infos), "dtypes": dict(Counter(i.dtype for i in infos).most_common())}


def compare_keys(ctx: Context, component: str, weights: ShardFolder, expected: dict[str, tuple[int, ...]], *,
                 droppable: set[str], other_naming: tuple[str, set[str]] | None = None,
                 config_rel: str = "config.json") -> None:
    """Missing, unexpected and mis-shaped keys against the expected key set from the config and key map."""
    folder_rel = ctx.rel(weights.folder)
    located = weights.located
    mismatch = keymap.compare_key_sets({key: info.shape for key, (_, info) in located.items()}, expected)
    for key in mismatch.missing:
        ctx.findings.error(component, "missing_key", f"{key} {list(expected[key])} is missing", folder_rel, key)
    for key in mismatch.unexpected:
        name, info = located[key]
        rel = ctx.rel(weights.folder / name)
        if key in droppable:
            ctx.findings.warning(component, "droppable_key", f"holds {key}, a parameter-free LayerNorm's affine "
                                 "term: the model has no such parameter (dropped on conversion; --deep checks "
                                 "it is the identity)", rel, key)
        else:
            ctx.findings.error(component, "unexpected_key", f"holds {key} {list(info.shape)}, which is not a "
                               f"parameter of the model described by {config_rel}", rel, key)
    if other_naming is not None:
        naming, other_keys = other_naming
        foreign = sum(1 for key in mismatch.unexpected if key in other_keys)
        if foreign and foreign >= len(mismatch.unexpected) // 2:
            ctx.findings.error(component, "wrong_naming", f"{foreign} of {len(located)} keys use the {naming} "
                               "key naming: the weights do not match this layout (convert them, or pass the "
                               "right --layout)", folder_rel)
    for key in mismatch.misshaped:
        name, info = located[key]
        ctx.findings.error(component, "shape_mismatch", f"{key} has shape {list(info.shape)}, expected "
                           f"{list(expected[key])} from {config_rel}", ctx.rel(weights.folder / name), key)


@dataclass(frozen=True)
class DtypeExpectations:
    expected: str | None = None  # safetensors dtype name every floating tensor must have (--dtype)
    allow_mixed: bool = False
    recorded: dict[str, dict[str, str]] = field(default_factory=dict)  # file -> key -> dtype in the manifest


def check_dtypes(ctx: Context, component: str, folder: Path, tensors: dict[str, tuple[str, TensorInfo]],
                 policy: DtypeExpectations, what: str = "tensors") -> None:
    """Integer parameters, tensors off the --dtype or manifest dtype, and mixed dtypes."""
    census = Counter(info.dtype for _, info in tensors.values())
    dominant = census.most_common(1)[0][0] if census else None
    rels: dict[str, str] = {}
    for key, (name, info) in tensors.items():
        rel = rels.get(name) or rels.setdefault(name, ctx.rel(folder / name))
        recorded = policy.recorded.get(rel, {}).get(key)
        if info.dtype not in FLOATING:
            ctx.findings.error(component, "dtype_mismatch", f"{key} is {info.dtype}, not a floating-point dtype",
                               rel, key)
        elif recorded is not None and info.dtype != recorded:
            ctx.findings.error(component, "dtype_mismatch", f"{key} is {friendly(info.dtype)} but the conversion "
                               f"manifest records {friendly(recorded)}", rel, key)
        elif policy.expected is not None and info.dtype != policy.expected:
            ctx.findings.error(component, "dtype_mismatch", f"{key} is {friendly(info.dtype)}, expected "
                               f"{friendly(policy.expected)} (--dtype)", rel, key)
        elif policy.expected is None and recorded is None and info.dtype != dominant:
            severity = "warning" if policy.allow_mixed else "error"
            ctx.findings.add(severity, component, "dtype_mismatch",
                             f"{key} is {friendly(info.dtype)} while {census[dominant]} of {sum(census.values())} "
                             f"{what} are {friendly(dominant)} (mixed dtypes)", rel, key)

