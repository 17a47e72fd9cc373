"""Weight folders from headers only: shard sets, indexes, duplicates, and the expected key set.

No tensor data is read here. A folder's tensors are located the way a loader that globs `*.safetensors`
would see them (every readable file; the index decides which copy of a duplicate counts).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import FLOATING, friendly
from ..errors import HeaderError, LongcatError
from ..io import SafetensorsHeader, ShardIndex, TensorInfo, index_from_document, read_header, read_json
from ..io.pickles import is_pickle_name, pickle_message, sniff_pickle
from ..jsonschemas import schema_findings
from .tree import Context


@dataclass
class WeightSet:
    component: str
    folder: Path
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict)  # file name -> header
    index: ShardIndex | None = None
    located: dict[str, tuple[str, TensorInfo]] = field(default_factory=dict)  # key -> (file name, info)

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {key: info for key, (_, info) in self.located.items()}

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for _, info in self.located.values())

    def dtype_census(self) -> dict[str, int]:
        return dict(Counter(info.dtype for _, info in self.located.values()).most_common())

    def summary(self, ctx: Context) -> dict:
        return {"path": ctx.rel(self.folder), "files": sorted(self.headers),
                "index": self.index.path.name if self.index else None, "tensors": len(self.located),
                "bytes": self.total_bytes, "dtypes": self.dtype_census()}


@dataclass(frozen=True)
class FolderRules:
    """What the loader of a component expects of its weight folder."""

    prefix: str  # `model` or `diffusion_pytorch_model`
    names_matter: bool  # False when the loader globs every *.safetensors (FastVideo's transformer loader)


def scan_weight_folder(ctx: Context, component: str, folder: Path, rules: FolderRules) -> WeightSet:
    weights = WeightSet(component, folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    shard_paths = [p for p in files if p.name.endswith(".safetensors")]
    for path in files:
        if is_pickle_name(path):
            # Next to safetensors weights loaders ignore a pickle; in their place it is what they would load.
            severity = "warning" if shard_paths else "error"
            ctx.findings.add(severity, component, "pickle_file", pickle_message(path), ctx.rel(path))
    index_paths = [p for p in files if p.name.endswith(".safetensors.index.json")]
    for path in shard_paths:
        header = read_header_or_report(ctx, component, path)
        if header is not None:
            weights.headers[path.name] = header
            ctx.headers[ctx.rel(path)] = header
    if not shard_paths and not any(is_pickle_name(p) for p in files):
        ctx.findings.error(component, "no_weights", "holds no *.safetensors file", ctx.rel(folder))
    weights.index = _choose_index(ctx, component, folder, index_paths, rules)
    if weights.index is not None:
        _check_index(ctx, component, weights, [p.name for p in shard_paths])
    else:
        _check_unindexed(ctx, component, folder, [p.name for p in shard_paths], rules)
    _locate(ctx, component, weights)
    return weights


def read_header_or_report(ctx: Context, component: str, path: Path) -> SafetensorsHeader | None:
    try:
        return read_header(path)
    except HeaderError as exc:
        rel = ctx.rel(path)
        if path.stat().st_size == 0:
            ctx.findings.error(component, "unreadable_file", "is empty (0 bytes), not a safetensors file", rel)
        elif sniff_pickle(path):
            ctx.findings.error(component, "pickle_file", pickle_message(path), rel)
        else:
            ctx.findings.error(component, "unreadable_file", exc.message, rel)
        return None


def _choose_index(ctx: Context, component: str, folder: Path, index_paths: list[Path],
                  rules: FolderRules) -> ShardIndex | None:
    if not index_paths:
        return None
    expected = f"{rules.prefix}.safetensors.index.json"
    by_name = {p.name: p for p in index_paths}
    chosen = by_name.get(expected, index_paths[0])
    if len(index_paths) > 1:
        ctx.findings.error(component, "several_indexes", f"holds {len(index_paths)} index files "
                           f"({', '.join(sorted(by_name))}); checked {chosen.name}", ctx.rel(folder))
    elif rules.names_matter and chosen.name != expected:
        ctx.findings.error(component, "weight_file_name", f"the loader looks for {expected}", ctx.rel(chosen))
    return _read_index(ctx, component, chosen)


def _read_index(ctx: Context, component: str, path: Path) -> ShardIndex | None:
    rel = ctx.rel(path)
    try:
        document = read_json(path)
    except LongcatError as exc:
        ctx.findings.error(component, "bad_index", exc.message, rel)
        return None
    problems = schema_findings("safetensors-index", _one_entry_per_shard(document))
    if problems:
        for problem in problems:
            ctx.findings.error(component, "bad_index", f"does not match the index schema: {problem.text}", rel)
        return None
    try:
        return index_from_document(document, path)
    except LongcatError as exc:
        ctx.findings.error(component, "bad_index", exc.message, rel)
        return None


def _one_entry_per_shard(document):
    """The index with one weight_map entry per distinct shard name: the schema's per-entry rules are about
    the shard name, so this checks the same thing without walking thousands of identical entries."""
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict):
        return document
    kept: dict = {}
    seen: set = set()
    for key, value in weight_map.items():
        marker = value if isinstance(value, str) else repr(value)
        if marker not in seen or key == "":
            seen.add(marker)
            kept[key] = value
    return {**document, "weight_map": kept}


def _check_index(ctx: Context, component: str, weights: WeightSet, shard_names: list[str]) -> None:
    index = weights.index
    index_rel = ctx.rel(index.path)
    named = set(index.shard_files)
    keys_per_file = Counter(index.weight_map.values())
    for name in sorted(named):
        if name not in weights.headers and name not in shard_names:
            ctx.findings.error(component, "missing_shard",
                               f"names {name} ({keys_per_file[name]} keys), which does not exist", index_rel)
    for key, name in index.weight_map.items():
        header = weights.headers.get(name)
        if header is not None and key not in header.tensors:
            elsewhere = [f for f, h in weights.headers.items() if key in h.tensors]
            where = f" (it is in {', '.join(elsewhere)})" if elsewhere else ""
            ctx.findings.error(component, "index_key_not_in_shard",
                               f"maps {key} to {name}, which does not contain it{where}", index_rel, key)
    for name, header in weights.headers.items():
        if name not in named:
            ctx.findings.error(component, "unindexed_file", f"is not listed in {index.path.name} "
                               "(diffusers ignores it; FastVideo, which globs *.safetensors, loads it)",
                               ctx.rel(weights.folder / name))
            continue
        for key in header.tensors:
            if key not in index.weight_map:
                ctx.findings.error(component, "unindexed_tensor", f"holds {key}, which {index.path.name} does "
                                   "not list", ctx.rel(weights.folder / name), key)
    _check_total_size(ctx, component, weights, named, index_rel)


def _check_total_size(ctx: Context, component: str, weights: WeightSet, named: set[str], index_rel: str) -> None:
    total = weights.index.total_size
    if total is None:
        ctx.findings.warning(component, "total_size_mismatch", "has no metadata.total_size", index_rel)
        return
    if not named <= set(weights.headers):
        return  # a shard is missing or unreadable; already reported
    actual = sum(info.nbytes for name in named for info in weights.headers[name].tensors.values())
    if actual != total:
        ctx.findings.error(component, "total_size_mismatch",
                           f"metadata.total_size is {total} but the shards' tensors take {actual} bytes", index_rel)


def _check_unindexed(ctx: Context, component: str, folder: Path, shard_names: list[str], rules: FolderRules) -> None:
    if not rules.names_matter:
        return
    expected = f"{rules.prefix}.safetensors"
    if len(shard_names) > 1:
        ctx.findings.error(component, "no_index", f"holds {len(shard_names)} *.safetensors files but no "
                           f"{rules.prefix}.safetensors.index.json", ctx.rel(folder))
    elif len(shard_names) == 1 and shard_names[0] != expected:
        ctx.findings.error(component, "weight_file_name", f"the loader looks for {expected} "
                           f"(or {rules.prefix}.safetensors.index.json)", ctx.rel(folder / shard_names[0]))


def _locate(ctx: Context, component: str, weights: WeightSet) -> None:
    holders: dict[str, list[str]] = {}
    for name, header in weights.headers.items():
        for key in header.tensors:
            holders.setdefault(key, []).append(name)
    weight_map = weights.index.weight_map if weights.index else {}
    for key, names in holders.items():
        chosen = weight_map.get(key) if weight_map.get(key) in names else names[0]
        weights.located[key] = (chosen, weights.headers[chosen].tensors[key])
        if len(names) > 1:
            ctx.findings.error(component, "duplicate_key", f"{key} is in {len(names)} files: {', '.join(names)} "
                               "(one silently overwrites the other when they are merged)",
                               ctx.rel(weights.folder / names[1]), key)


def compare_keys(ctx: Context, weights: WeightSet, expected: dict[str, tuple[int, ...]], *,
                 droppable: set[str], other_naming: tuple[str, set[str]] | None = None,
                 config_rel: str = "config.json") -> None:
    """Missing, unexpected and mis-shaped keys against the expected key set from the config and key map."""
    component, folder_rel = weights.component, ctx.rel(weights.folder)
    located = weights.located
    for key, shape in expected.items():
        if key not in located:
            ctx.findings.error(component, "missing_key", f"{key} {list(shape)} is missing", folder_rel, key)
    unexpected = [key for key in located if key not in expected]
    for key in unexpected:
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
        foreign = sum(1 for key in unexpected if key in other_keys)
        if foreign and foreign >= len(unexpected) // 2:
            ctx.findings.error(component, "wrong_naming", f"{foreign} of {len(located)} keys use the {naming} "
                               "key naming: the weights do not match this layout (convert them, or pass the "
                               "right --layout)", folder_rel)
    for key, shape in expected.items():
        if key in located and located[key][1].shape != shape:
            name, info = located[key]
            ctx.findings.error(component, "shape_mismatch", f"{key} has shape {list(info.shape)}, expected "
                               f"{list(shape)} from {config_rel}", ctx.rel(weights.folder / name), key)


@dataclass(frozen=True)
class DtypePolicy:
    expected: str | None = None  # safetensors dtype name every floating tensor must have (--dtype)
    allow_mixed: bool = False
    recorded: dict[str, dict[str, str]] = field(default_factory=dict)  # file -> key -> dtype in the manifest


def check_dtypes(ctx: Context, component: str, folder: Path, tensors: dict[str, tuple[str, TensorInfo]],
                 policy: DtypePolicy, what: str = "tensors") -> None:
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

