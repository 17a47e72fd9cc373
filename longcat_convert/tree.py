"""Read a checkpoint tree: detect its layout, read the DiT config, every shard header, the index and
the LoRA adapters (headers plus their 0-d alpha scalars). Nothing else is read. Strict: any
inconsistency that would make a conversion ambiguous is an error naming the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import keymap
from .dtypes import scalar_from_bytes
from .errors import LongcatError
from .io import SafetensorsHeader, ShardIndex, SourceFiles, read_index, tensor_range
from .layout_detect import detect_layout
from .lora import detect_format

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SKIPPED_TOP_LEVEL = (".cache", ".git", ".gitattributes", "conversion.json", "model_index.json")


@dataclass
class DitFiles:
    folder: str  # relative to the tree root
    config: dict
    headers: dict[str, SafetensorsHeader]  # relative file -> header
    index: ShardIndex | None
    key_files: dict[str, str]  # tensor name -> relative file

    def info(self, key: str):
        return self.headers[self.key_files[key]].tensors[key]


@dataclass
class Adapter:
    name: str
    file: str  # relative to the tree root
    header: SafetensorsHeader
    format: str  # "upstream" or "fastvideo"
    alphas: dict[str, float] = field(default_factory=dict)
    alpha_dtypes: dict[str, str] = field(default_factory=dict)


@dataclass
class Tree:
    root: Path
    layout: str
    dit: DitFiles
    adapters: list[Adapter]
    other_files: list[str]  # relative paths carried over unchanged
    model_index: dict | None
    sources: SourceFiles = field(default_factory=SourceFiles)  # the files read above, held open for the conversion

    @property
    def naming(self) -> str:
        return keymap.layout(self.layout)["naming"]

    def path(self, relative: str) -> Path:
        return self.root / relative


def load_json(path: Path, sources: SourceFiles | None = None) -> dict:
    """sources: read through them, so that a change before the conversion commits is caught."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") if sources is None else sources.read_file(path).decode("utf-8"))
    except FileNotFoundError:
        raise LongcatError("does not exist", path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LongcatError(f"is not valid JSON ({exc})", path, "fix or re-create the file") from None
    if not isinstance(data, dict):
        raise LongcatError("is not a JSON object", path)
    return data


def _inside(root: Path, path: Path, follow_symlinks: bool) -> None:
    if follow_symlinks or not path.is_symlink():
        return
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise LongcatError("is a broken or looping symlink", path, "remove it or fix its target") from None
    if not target.is_relative_to(root.resolve()):
        raise LongcatError(f"is a symlink to {target}, outside the tree", path,
                           "pass --follow-symlinks if you trust it, or copy the file in")


def _refuse_pickles(folder: Path) -> None:
    for entry in sorted(folder.iterdir()):
        if entry.suffix in PICKLE_SUFFIXES:
            raise LongcatError("is a pickled checkpoint; it is never loaded (unpickling runs arbitrary code)",
                               entry, "convert it to safetensors with a tool you trust first")


def read_dit(root: Path, folder: str, naming: str, follow_symlinks: bool = False,
             sources: SourceFiles | None = None) -> DitFiles:
    base = root / folder
    sources = sources or SourceFiles()
    config = load_json(base / "config.json", sources)
    _refuse_pickles(base)
    files = sorted(p for p in base.iterdir() if p.name.endswith(".safetensors"))
    indexes = sorted(p for p in base.iterdir() if p.name.endswith(".safetensors.index.json"))
    if len(indexes) > 1:
        raise LongcatError(f"has {len(indexes)} index files: {', '.join(p.name for p in indexes)}", base,
                           "keep the one that matches the shards")
    if not files:
        raise LongcatError("holds no .safetensors file", base, "the DiT weights are missing")
    for path in files:
        _inside(root, path, follow_symlinks)
    headers = {f"{folder}/{p.name}": sources.header(p) for p in files}
    index = read_index(indexes[0], sources.read_file(indexes[0])) if indexes else None
    key_files = _key_files(base, folder, headers, index)
    keymap.expand(config, naming, str(base / "config.json"))  # fails early on a malformed config
    return DitFiles(folder, config, headers, index, key_files)


def _key_files(base: Path, folder: str, headers: dict[str, SafetensorsHeader], index: ShardIndex | None) -> dict[str, str]:
    key_files: dict[str, str] = {}
    for file, header in headers.items():
        for key in header.tensors:
            if key in key_files:
                raise LongcatError(f"tensor {key!r} is in both {key_files[key]} and {file}", base,
                                   "remove the stray shard")
            key_files[key] = file
    if index is None:
        return key_files
    indexed = {f"{folder}/{name}" for name in index.weight_map.values()}
    stray = sorted(set(headers) - indexed)
    if stray:
        raise LongcatError(f"shard {stray[0]} is not named by the index", index.path,
                           "remove the stray shard or re-create the index")
    for key, name in index.weight_map.items():
        file = f"{folder}/{name}"
        if file not in headers:
            raise LongcatError(f"index names {name}, which does not exist", index.path, "the tree is incomplete")
        if key_files.get(key) != file:
            raise LongcatError(f"index says {key!r} is in {name}, but that shard lacks it", index.path,
                               "re-create the index")
    unindexed = sorted(set(key_files) - set(index.weight_map))
    if unindexed:
        raise LongcatError(f"{len(unindexed)} tensors are in shards but not in the index, e.g. {unindexed[0]!r}",
                           index.path, "re-create the index")
    return key_files


def read_adapters(root: Path, layout_name: str, follow_symlinks: bool = False,
                  sources: SourceFiles | None = None) -> list[Adapter]:
    spec = keymap.layout(layout_name)
    base = root / spec["lora_dir"]
    if not base.is_dir():
        return []
    _refuse_pickles(base)
    files = sorted(base.glob("*.safetensors")) if spec["lora_format"] == "upstream" else sorted(base.glob("*/*.safetensors"))
    adapters = []
    sources = sources or SourceFiles()
    for path in files:
        _inside(root, path, follow_symlinks)
        header = sources.header(path)
        fmt = detect_format(header)
        if fmt != spec["lora_format"]:
            raise LongcatError(f"is a {fmt}-format LoRA in a {layout_name} tree", path,
                               f"{layout_name} trees hold {spec['lora_format']}-format adapters")
        adapter = Adapter(path.stem, str(path.relative_to(root)), header, fmt)
        for key, info in header.tensors.items():
            if key.endswith(("alpha_scale", "lora_alpha")):
                adapter.alphas[key] = scalar_from_bytes(sources.read(tensor_range(header, key)), info.dtype)
                adapter.alpha_dtypes[key] = info.dtype
        adapters.append(adapter)
    names = [a.name for a in adapters]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise LongcatError(f"two adapters are named {sorted(duplicates)[0]!r}", base, "rename one of the files")
    return adapters


def list_other_files(root: Path, layout_name: str, follow_symlinks: bool = False) -> list[str]:
    spec = keymap.layout(layout_name)
    owned = {spec["dit_dir"], spec["lora_dir"]}
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        relative_dir = Path(dirpath).relative_to(root)
        top = relative_dir.parts[0] if relative_dir.parts else None
        if top is None:
            dirnames[:] = sorted(d for d in dirnames if d not in owned and d not in SKIPPED_TOP_LEVEL)
            names = [f for f in filenames if f not in SKIPPED_TOP_LEVEL]
        else:
            dirnames.sort()
            names = filenames
        for name in sorted(names):
            path = Path(dirpath) / name
            _inside(root, path, follow_symlinks)
            if not path.is_file():
                raise LongcatError("is not a regular file", path, "remove it")
            found.append(str(path.relative_to(root)))
    return found


def read_tree(root: str | Path, layout_name: str | None = None, follow_symlinks: bool = False) -> Tree:
    root = Path(os.path.abspath(root))
    layout_name = detect_layout(root, layout_name).name
    spec = keymap.layout(layout_name)
    sources = SourceFiles()
    dit = read_dit(root, spec["dit_dir"], spec["naming"], follow_symlinks, sources)
    model_index_path = root / "model_index.json"
    model_index = load_json(model_index_path) if model_index_path.is_file() else None
    return Tree(root, layout_name, dit, read_adapters(root, layout_name, follow_symlinks, sources),
                list_other_files(root, layout_name, follow_symlinks), model_index, sources)
