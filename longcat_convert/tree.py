"""Read a checkpoint tree: detect its layout, list every file, read the DiT config, every shard header, the
index and the LoRA adapters (headers plus their 0-d alpha scalars). Nothing else is read. Strict: any
inconsistency that would make a conversion ambiguous is an error naming the file.

Every file below the root is accounted for: a DiT shard, index or config; a LoRA adapter (any
`*.safetensors` below the LoRA folder); the model index; a file carried over unchanged; or a skipped
file with its reason (pickles, which are never opened, and the source repository's own metadata).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import keymap
from .errors import LongcatError
from .io import SafetensorsHeader, ShardIndex, SourceFiles, read_index
from .io.jsonfile import MAX_JSON_BYTES, JsonFileError, parse_json
from .io.pickles import is_pickle_name
from .layout_detect import detect_layout
from .lora import ParsedLora, parse

# Top-level entries that are the source repository's own bookkeeping, never part of a converted tree.
SKIPPED_TOP_LEVEL = {
    ".git": "the source repository's git data",
    ".cache": "a download cache (huggingface_hub)",
    ".gitattributes": "git metadata of the source repository",
    "conversion.json": "the source's conversion manifest; the conversion writes its own",
}
PICKLE_REASON = "a pickle file: never opened (unpickling runs arbitrary code) and not copied"


@dataclass(frozen=True)
class OtherFile:
    path: str  # relative to the tree root, POSIX separators
    nbytes: int


@dataclass(frozen=True)
class Skipped:
    path: str  # relative to the tree root; a folder ends in "/"
    reason: str


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
    lora: ParsedLora  # its keys grouped by module, its alphas read

    @property
    def header(self) -> SafetensorsHeader:
        return self.lora.header

    @property
    def format(self) -> str:
        return self.lora.format


@dataclass
class Tree:
    root: Path
    layout: str
    dit: DitFiles
    adapters: list[Adapter]
    other_files: list[OtherFile]  # carried over unchanged
    model_index: dict | None
    skipped: list[Skipped] = field(default_factory=list)
    sources: SourceFiles = field(default_factory=SourceFiles)  # the files read above, held open for the conversion

    @property
    def naming(self) -> str:
        return keymap.layout(self.layout)["naming"]

    def path(self, relative: str) -> Path:
        return self.root / relative


def load_json(path: Path, sources: SourceFiles) -> dict:
    """A JSON object read through `sources`, so that a change before the conversion commits is caught."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise JsonFileError("is missing (the file does not exist)", path, missing=True) from None
    if size > MAX_JSON_BYTES:
        raise JsonFileError(f"is larger than {MAX_JSON_BYTES} bytes, too large for a JSON file", path)
    document = parse_json(sources.read_file(path), path)
    if not isinstance(document, dict):
        raise JsonFileError(f"holds a JSON {type(document).__name__}, not an object", path)
    return document


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


def read_dit(root: Path, folder: str, naming: str, follow_symlinks: bool = False,
             sources: SourceFiles | None = None) -> DitFiles:
    base = root / folder
    sources = sources or SourceFiles()
    config = load_json(base / "config.json", sources)
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
    tensors = [info for header in headers.values() for info in header.tensors.values()]
    keymap.check_fits(config, naming, str(base / "config.json"), len(tensors), sum(i.numel for i in tensors))
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


def read_adapters(root: Path, layout_name: str, files: list[str], sources: SourceFiles | None = None) -> list[Adapter]:
    """Every `*.safetensors` below the layout's LoRA folder (`files`: the tree's files, relative)."""
    spec = keymap.layout(layout_name)
    prefix = spec["lora_dir"] + "/"
    adapters = []
    sources = sources or SourceFiles()
    for relative in files:
        if not (relative.startswith(prefix) and relative.endswith(".safetensors")):
            continue
        path = root / relative
        lora = parse(sources.header(path), sources.read)
        if lora.format not in (None, spec["lora_format"]):
            raise LongcatError(f"is a {lora.format}-format LoRA in a {layout_name} tree", path,
                               f"{layout_name} trees hold {spec['lora_format']}-format adapters")
        adapters.append(Adapter(path.stem, relative, lora.check()))
    return adapters


def list_files(root: Path, follow_symlinks: bool = False) -> tuple[list[str], list[Skipped]]:
    """Every regular file below `root` (relative POSIX paths, sorted), and the top-level entries skipped.

    Symlinked folders inside the tree are followed; one pointing outside it is refused unless
    `follow_symlinks`; loops are refused. FIFOs, sockets and devices are refused."""
    files: list[str] = []
    skipped: list[Skipped] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in visited:
            raise LongcatError("is part of a symlink loop; refused", here, "replace the links by real folders")
        visited.add(real)
        relative_dir = here.relative_to(root)
        for name in sorted(dirnames + filenames):
            if not relative_dir.parts and name in SKIPPED_TOP_LEVEL:
                skipped.append(Skipped(name + ("/" if name in dirnames else ""), SKIPPED_TOP_LEVEL[name]))
        if not relative_dir.parts:
            dirnames[:] = [d for d in dirnames if d not in SKIPPED_TOP_LEVEL]
            filenames = [f for f in filenames if f not in SKIPPED_TOP_LEVEL]
        dirnames.sort()
        for name in dirnames:
            _inside(root, here / name, follow_symlinks)
        for name in sorted(filenames):
            path = here / name
            _inside(root, path, follow_symlinks)
            if not path.is_file():
                raise LongcatError("is not a regular file (a FIFO, socket, device or broken link)", path, "remove it")
            files.append((relative_dir / name).as_posix())
    return files, skipped


def _other_files(root: Path, files: list[str], dit: DitFiles, adapters: list[Adapter],
                 skipped: list[Skipped]) -> list[OtherFile]:
    """The files carried over unchanged: all but the DiT's shards/index/config, adapters, the model index and
    pickles (which join `skipped`)."""
    owned = set(dit.headers) | {a.file for a in adapters} | {f"{dit.folder}/config.json", "model_index.json"}
    if dit.index is not None:
        owned.add(f"{dit.folder}/{dit.index.path.name}")
    others = []
    for relative in files:
        if relative in owned:
            continue
        if is_pickle_name(relative):
            skipped.append(Skipped(relative, PICKLE_REASON))
            continue
        others.append(OtherFile(relative, (root / relative).stat().st_size))
    return others


def read_tree(root: str | Path, layout_name: str | None = None, follow_symlinks: bool = False) -> Tree:
    root = Path(os.path.abspath(root))
    layout_name = detect_layout(root, layout_name).name
    spec = keymap.layout(layout_name)
    sources = SourceFiles()
    files, skipped = list_files(root, follow_symlinks)
    dit = read_dit(root, spec["dit_dir"], spec["naming"], follow_symlinks, sources)
    adapters = read_adapters(root, layout_name, files, sources)
    model_index_path = root / "model_index.json"
    model_index = load_json(model_index_path, sources) if model_index_path.is_file() else None
    return Tree(root, layout_name, dit, adapters, _other_files(root, files, dit, adapters, skipped), model_index,
                skipped, sources)
