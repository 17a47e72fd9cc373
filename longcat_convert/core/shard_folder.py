"""Read one weight folder (a DiT, text-encoder or VAE folder) from its headers: which safetensors files it holds,
its index, the file each tensor is read from, and every problem found, collected rather than raised.

The one scanner of the project: `validate` reports each problem as a finding of the same kind; reading a tree
(convert, inspect, the reference runner) raises the first error. Tensors are located the way a loader that
globs `*.safetensors` would see them (every readable file; the index decides which copy of a duplicate
counts). No tensor data is read; headers and the index come through a `FileReader` (held `SourceFiles` for a
conversion, `DirectFiles` otherwise).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import keymap
from .errors import HeaderError, LongcatError, Problem
from .io import FileReader, SafetensorsHeader, ShardIndex, TensorInfo, read_json
from .io.index import index_from_document, index_name
from .io.pickles import is_pickle_name, pickle_message, sniff_pickle
from .jsonschemas import schema_findings

# What to do about each kind of problem, for the one-line error of a strict read.
FIXES = {
    **dict.fromkeys(("bad_index", "index_key_not_in_shard", "unindexed_tensor", "total_size_mismatch"),
                    "re-create the index"),
    "unreadable_file": "re-download or re-create the file",
    "several_indexes": "keep the one that matches the shards",
    "no_weights": "the weights are missing: restore the *.safetensors files",
    "weight_file_name": "rename the file to the name the loader looks for",
    "missing_shard": "the tree is incomplete: restore the shard or re-create the index",
    "unindexed_file": "remove the stray shard or re-create the index",
    "duplicate_key": "remove the stray shard",
    "no_index": "add the index that came with the shards",
}


@dataclass(frozen=True)
class FolderRules:
    """What the loader of a component expects of its weight folder."""

    prefix: str  # `model` or `diffusion_pytorch_model`
    names_matter: bool  # False when the loader globs every *.safetensors (FastVideo's transformer loader)

    @classmethod
    def dit(cls, naming: str) -> FolderRules:
        return cls(keymap.load_map_document()["shard_prefix"], names_matter=naming == "upstream")


@dataclass
class ShardFolder:
    folder: Path
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict)  # file name -> header (readable ones)
    index: ShardIndex | None = None
    located: dict[str, tuple[str, TensorInfo]] = field(default_factory=dict)  # key -> (file name, info)
    problems: list[Problem] = field(default_factory=list)

    def add(self, kind: str, message: str, path: Path, key: str | None = None, severity: str = "error") -> None:
        self.problems.append(Problem(kind, message, key, severity, path))


def scan_shard_folder(folder: Path, rules: FolderRules, files: FileReader) -> ShardFolder:
    scan = ShardFolder(folder)
    entries = sorted(p for p in folder.iterdir() if p.is_file())
    shard_paths = [p for p in entries if p.name.endswith(".safetensors")]
    for path in entries:
        if is_pickle_name(path):
            # Next to safetensors weights loaders ignore a pickle; in their place it is what they would load.
            scan.add("pickle_file", pickle_message(path), path, severity="warning" if shard_paths else "error")
    for path in shard_paths:
        header = read_header_or_problem(path, files, scan.problems)
        if header is not None:
            scan.headers[path.name] = header
    if not shard_paths and not any(is_pickle_name(p) for p in entries):
        scan.add("no_weights", "holds no *.safetensors file", folder)
    shard_names = [p.name for p in shard_paths]
    scan.index = _choose_index(scan, [p for p in entries if p.name.endswith(".safetensors.index.json")], rules,
                               files)
    if scan.index is not None:
        _check_index(scan, shard_names)
    else:
        _check_unindexed(scan, shard_names, rules)
    _locate(scan)
    return scan


def read_header_or_problem(path: Path, files: FileReader, problems: list[Problem]) -> SafetensorsHeader | None:
    """The file's header, or None after adding why it cannot be read (a pickle in disguise is named as one)."""
    try:
        return files.header(path)
    except HeaderError as exc:
        if path.stat().st_size == 0:
            problems.append(Problem("unreadable_file", "is empty (0 bytes), not a safetensors file", path=path))
        elif sniff_pickle(path):
            problems.append(Problem("pickle_file", pickle_message(path), path=path))
        else:
            problems.append(Problem("unreadable_file", exc.message, path=path, fix=exc.fix))
        return None


def _choose_index(scan: ShardFolder, index_paths: list[Path], rules: FolderRules,
                  files: FileReader) -> ShardIndex | None:
    if not index_paths:
        return None
    expected = index_name(rules.prefix)
    by_name = {p.name: p for p in index_paths}
    chosen = by_name.get(expected, index_paths[0])
    if len(index_paths) > 1:
        scan.add("several_indexes", f"holds {len(index_paths)} index files ({', '.join(sorted(by_name))}); "
                 f"checked {chosen.name}", scan.folder)
    elif rules.names_matter and chosen.name != expected:
        scan.add("weight_file_name", f"the loader looks for {expected}", chosen)
    return _read_index(scan, chosen, files)


def _read_index(scan: ShardFolder, path: Path, files: FileReader) -> ShardIndex | None:
    try:
        document = read_json(path, read=files.read_file)
        problems = schema_findings("safetensors-index", _one_entry_per_shard(document))
        if not problems:
            return index_from_document(document, path)
    except LongcatError as exc:
        scan.add("bad_index", exc.message, path)
        return None
    for problem in problems:
        scan.add("bad_index", f"does not match the index schema: {problem.text}", path)
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


def _check_index(scan: ShardFolder, shard_names: list[str]) -> None:
    index = scan.index
    named = set(index.shard_files)
    keys_per_file = Counter(index.weight_map.values())
    for name in sorted(named):
        if name not in scan.headers and name not in shard_names:
            scan.add("missing_shard", f"names {name} ({keys_per_file[name]} keys), which does not exist", index.path)
    for key, name in index.weight_map.items():
        header = scan.headers.get(name)
        if header is not None and key not in header.tensors:
            elsewhere = [f for f, h in scan.headers.items() if key in h.tensors]
            where = f" (it is in {', '.join(elsewhere)})" if elsewhere else ""
            scan.add("index_key_not_in_shard", f"maps {key} to {name}, which does not contain it{where}", index.path,
                     key)
    for name, header in scan.headers.items():
        if name not in named:
            scan.add("unindexed_file", f"is not listed in {index.path.name} (diffusers ignores it; FastVideo, which "
                     "globs *.safetensors, loads it)", scan.folder / name)
            continue
        for key in header.tensors:
            if key not in index.weight_map:
                scan.add("unindexed_tensor", f"holds {key}, which {index.path.name} does not list",
                         scan.folder / name, key)
    _check_total_size(scan, named)


def _check_total_size(scan: ShardFolder, named: set[str]) -> None:
    total = scan.index.total_size
    if total is None:
        scan.add("total_size_mismatch", "has no metadata.total_size", scan.index.path, severity="warning")
        return
    if not named <= set(scan.headers):
        return  # a shard is missing or unreadable; already reported
    actual = sum(info.nbytes for name in named for info in scan.headers[name].tensors.values())
    if actual != total:
        scan.add("total_size_mismatch", f"metadata.total_size is {total} but the shards' tensors take {actual} bytes",
                 scan.index.path)


def _check_unindexed(scan: ShardFolder, shard_names: list[str], rules: FolderRules) -> None:
    if not rules.names_matter:
        return
    expected = f"{rules.prefix}.safetensors"
    if len(shard_names) > 1:
        scan.add("no_index", f"holds {len(shard_names)} *.safetensors files but no {index_name(rules.prefix)}",
                 scan.folder)
    elif len(shard_names) == 1 and shard_names[0] != expected:
        scan.add("weight_file_name", f"the loader looks for {expected} (or {index_name(rules.prefix)})",
                 scan.folder / shard_names[0])


def _locate(scan: ShardFolder) -> None:
    holders: dict[str, list[str]] = {}
    for name, header in scan.headers.items():
        for key in header.tensors:
            holders.setdefault(key, []).append(name)
    weight_map = scan.index.weight_map if scan.index else {}
    for key, names in holders.items():
        chosen = weight_map.get(key) if weight_map.get(key) in names else names[0]
        scan.located[key] = (chosen, scan.headers[chosen].tensors[key])
        if len(names) > 1:
            scan.add("duplicate_key", f"{key} is in {len(names)} files: {', '.join(names)} (one silently overwrites "
                     "the other when they are merged)", scan.folder / names[1], key)
