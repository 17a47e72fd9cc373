"""Read a checkpoint tree: detect its layout, list every file, read the DiT config, every shard header, the
index and the LoRA adapters (headers plus their 0-d alpha scalars). Nothing else is read. Strict: any
inconsistency that would make a conversion ambiguous is an error naming the file.

Every file below the root is accounted for: a DiT shard, index or config; a LoRA adapter (any
`*.safetensors` below the LoRA folder); the model index; a file carried over unchanged; or a skipped
file with its reason (pickles, which are never opened, and the source repository's own metadata).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import keymap
from .errors import LongcatError, Problem, raise_first_error
from .io import SafetensorsHeader, ShardIndex, SourceFiles, TensorInfo, read_json_object
from .io.pickles import is_pickle_name
from .layout_detect import avatar_variant_of_layout, detect_layout
from .lora_format import ParsedLora, parse
from .shard_folder import FIXES, FolderRules, scan_shard_folder

if TYPE_CHECKING:
    import torch

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
    problems: list[Problem] = field(default_factory=list)  # the shard folder's (raised at once unless lenient)

    def header(self, key: str) -> SafetensorsHeader:
        return self.headers[self.key_files[key]]

    def info(self, key: str) -> TensorInfo:
        return self.header(key).tensors[key]


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
    avatar_variant: str | None = None  # avatar-v1.0 / avatar-v1.5 for a LongCat-Video-Avatar tree
    int8: bool = False  # the DiT read is the INT8 one (weight_int8 + weight_scale per quantised Linear)
    extra_dits: dict[str, DitFiles] = field(default_factory=dict)  # avatar 1.0's multi-speaker DiT, by folder

    @property
    def family(self) -> str:
        return keymap.layout_family(self.layout)

    @property
    def naming(self) -> str:
        return keymap.layout(self.layout)["naming"]

    @property
    def config_path(self) -> Path:
        return self.root / self.dit.folder / "config.json"

    @property
    def lora_dir(self) -> Path:
        return self.root / keymap.layout(self.layout)["lora_dir"]

    @property
    def lora_format(self) -> str:
        return keymap.layout(self.layout)["lora_format"]

    def describe(self) -> dict:
        """Where the tree is and what it is, for reports."""
        return {"path": str(self.root), "layout": self.layout, "naming": self.naming}

    def tensor(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A DiT tensor (or rows of it along dim 0), read from the held file its header came from."""
        return self.sources.tensor(self.dit.header(key), key, rows)


def read_dit(root: Path, folder: str, naming: str, sources: SourceFiles, rules: FolderRules | None = None) -> DitFiles:
    config = read_json_object(root / folder / "config.json", read=sources.read_file)
    scan = scan_shard_folder(root / folder, rules or FolderRules.dit(naming), sources)
    headers = {f"{folder}/{name}": header for name, header in scan.headers.items()}
    key_files = {key: f"{folder}/{name}" for key, (name, _) in scan.located.items()}
    return DitFiles(folder, config, headers, scan.index, key_files, scan.problems)


def int8_dit_folder(root: Path, variant: str | None) -> str:
    """The INT8 DiT folder of an avatar tree (`--from-int8`); an error for a tree without one."""
    folder = keymap.avatar_spec()["variants"].get(variant or "", {}).get("int8_dir")
    if folder is None or not (root / folder).is_dir():
        raise LongcatError("has no INT8 DiT folder (base_model_int8/ of a LongCat-Video-Avatar 1.5 tree)", root,
                           "drop --from-int8")
    return folder


def require_usable_dit(dit: DitFiles, config_path: Path, naming: str) -> None:
    """Raise if the config is not one of `naming`'s DiT, on the shard folder's first error, or if the config
    describes far more than the weight files hold."""
    if not keymap.config_describes(dit.config, naming):
        raise LongcatError(f"the DiT config does not describe {keymap.class_name(naming)}", config_path,
                           "use the config that came with these weights")
    raise_first_error(dit.problems, fixes=FIXES)
    held = [dit.info(key) for key in dit.key_files]
    keymap.check_fits(dit.config, naming, str(config_path), len(held), sum(i.numel for i in held))


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


@dataclass(frozen=True)
class Listing:
    files: list[str]  # every regular file below the root (relative POSIX paths, sorted), bookkeeping left out
    skipped: list[Skipped]  # the top-level bookkeeping entries left out (.git/, …)
    problems: list[Problem]  # dangling symlinks and FIFOs, sockets or devices: listed, never opened


def list_files(root: Path, follow_symlinks: bool = False) -> Listing:
    """Every file below `root`, the one walk of a tree that `validate`, `convert` and the reference runner share.

    Symlinked folders are followed. One line (LongcatError), before anything is read, for a symlink loop, a
    symlink to an ancestor folder, and, unless `follow_symlinks`, a symlink leaving the tree."""
    real_root = root.resolve()
    files: list[str] = []
    skipped: list[Skipped] = []
    problems: list[Problem] = []
    visited: set[str] = set()

    def refuse(error: OSError) -> None:
        raise LongcatError(f"cannot be listed ({error.strerror or error})", error.filename)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=refuse):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in visited:
            raise LongcatError("is part of a symlink loop; refused", here, "replace the links by real folders")
        visited.add(real)
        relative_dir = here.relative_to(root)
        if not relative_dir.parts:
            skipped += [Skipped(name + ("/" if name in dirnames else ""), SKIPPED_TOP_LEVEL[name])
                        for name in sorted(dirnames + filenames) if name in SKIPPED_TOP_LEVEL]
            dirnames[:] = [d for d in dirnames if d not in SKIPPED_TOP_LEVEL]
            filenames = [f for f in filenames if f not in SKIPPED_TOP_LEVEL]
        dirnames.sort()
        for name in dirnames:
            _check_link(real_root, here / name, follow_symlinks)
        for name in sorted(filenames):
            problem = _check_link(real_root, here / name, follow_symlinks) or _special_file(here / name)
            if problem is not None:
                problems.append(problem)
            else:
                files.append((relative_dir / name).as_posix())
    return Listing(files, skipped, problems)


def _check_link(real_root: Path, path: Path, follow_symlinks: bool) -> Problem | None:
    """A dangling symlink's problem; raises for loops, links to an ancestor and (unless followed) escapes."""
    if not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        return Problem("dangling_symlink", f"is a symlink to {os.readlink(path)!r}, which does not exist", path=path,
                       fix="remove it or fix its target")
    except (RuntimeError, OSError) as exc:  # RuntimeError: how Python < 3.13 reports a loop
        if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP:
            raise LongcatError("is part of a symlink loop; refused", path, "replace the links by real files") from None
        raise LongcatError(f"symlink cannot be resolved ({exc.strerror})", path) from None
    if not target.is_relative_to(real_root) and not follow_symlinks:
        raise LongcatError(f"is a symlink to {target}, outside the tree; refused", path,
                           "copy the file into the tree, or pass --follow-symlinks if you trust the target")
    if target.is_dir() and path.parent.resolve().is_relative_to(target):
        raise LongcatError(f"is a symlink to its ancestor folder {target}: a cycle; refused", path, "remove the link")
    return None


def _special_file(path: Path) -> Problem | None:
    if stat.S_ISREG(path.stat().st_mode):
        return None
    return Problem("special_file", "is not a regular file (FIFO, socket or device); it is never opened", path=path,
                   fix="remove it")


def _other_files(root: Path, files: list[str], dit: DitFiles, adapters: list[Adapter],
                 skipped: list[Skipped], extra_dits: list[DitFiles] = ()) -> list[OtherFile]:
    """The files carried over unchanged: all but the DiTs' shards/index/config, adapters, the model index and
    pickles (which join `skipped`)."""
    owned = {a.file for a in adapters} | {"model_index.json"}
    for each in (dit, *extra_dits):
        owned |= set(each.headers) | {f"{each.folder}/config.json"}
        if each.index is not None:
            owned.add(f"{each.folder}/{each.index.path.name}")
    others = []
    for relative in files:
        if relative in owned:
            continue
        if is_pickle_name(relative):
            skipped.append(Skipped(relative, PICKLE_REASON))
            continue
        others.append(OtherFile(relative, (root / relative).stat().st_size))
    return others


def read_tree(root: str | Path, layout_name: str | None = None, follow_symlinks: bool = False,
              sources: SourceFiles | None = None, strict: bool = True, int8: bool = False) -> Tree:
    """sources: the held files to read through (a conversion's, which validation has read through already).
    strict=False: the DiT folder's problems are kept in `tree.dit.problems` for the caller to report, and
    `require_usable_dit` is the caller's to run before the tree is used as a model."""
    root = Path(os.path.abspath(root))
    layout_name = detect_layout(root, layout_name).name
    spec = keymap.layout(layout_name)
    sources = sources or SourceFiles()
    listing = list_files(root, follow_symlinks)
    raise_first_error(listing.problems)
    files, skipped = listing.files, list(listing.skipped)
    variant = avatar_variant_of_layout(layout_name, root)
    dit_dir, rules = spec["dit_dir"], None
    if not int8 and variant is not None and not (root / dit_dir).is_dir():
        int8_dir = keymap.avatar_spec()["variants"][variant].get("int8_dir")
        if int8_dir and (root / int8_dir).is_dir():
            raise LongcatError(f"has only the INT8 DiT ({int8_dir}/), no {dit_dir}/", root,
                               "convert it with --from-int8 --dtype bfloat16 (or float32)")
    if int8:
        if spec["naming"] != "upstream":
            raise LongcatError(f"--from-int8 reads base_model_int8/ of a raw or diffusers avatar tree, not of a "
                               f"{layout_name} one", root, "convert the raw avatar tree instead")
        dit_dir = int8_dit_folder(root, variant)
        quantization = keymap.quantization_spec(keymap.AVATAR_FAMILY)
        rules = FolderRules(quantization["shard_prefix"], names_matter=True)
    dit = read_dit(root, dit_dir, spec["naming"], sources, rules)
    if strict:
        require_usable_dit(dit, root / dit_dir / "config.json", spec["naming"])
    extra_dits = {}
    for folder in keymap.extra_dit_folders(variant, layout_name):
        if (root / folder).is_dir():
            extra_dits[folder] = read_dit(root, folder, spec["naming"], sources)
            if strict:
                require_usable_dit(extra_dits[folder], root / folder / "config.json", spec["naming"])
    adapters = read_adapters(root, layout_name, files, sources)
    model_index_path = root / "model_index.json"
    model_index = None
    if model_index_path.is_file():
        model_index = read_json_object(model_index_path, read=sources.read_file)
    others = _other_files(root, files, dit, adapters, skipped, list(extra_dits.values()))
    if int8:
        others = _leave_out_float_dit(others, spec["dit_dir"], dit.folder, skipped)
    if variant is not None and spec["model_index"] is None:
        others += _sibling_files(root, variant, follow_symlinks, skipped)
    return Tree(root, layout_name, dit, adapters, others, model_index, skipped, sources, variant, int8, extra_dits)


def _leave_out_float_dit(others: list[OtherFile], float_dir: str, int8_dir: str,
                         skipped: list[Skipped]) -> list[OtherFile]:
    """Converting the INT8 DiT: the float DiT folder (the same model) and the INT8 metadata are not carried over."""
    kept = []
    for other in others:
        if other.path.startswith(float_dir + "/"):
            skipped.append(Skipped(other.path, "the float DiT: --from-int8 converts the INT8 one in its place"))
        elif other.path == f"{int8_dir}/quantization_config.json":
            skipped.append(Skipped(other.path, "INT8 metadata: the converted DiT is dequantised"))
        else:
            kept.append(other)
    return kept


def _sibling_files(root: Path, variant: str, follow_symlinks: bool, skipped: list[Skipped]) -> list[OtherFile]:
    """A raw avatar tree's base components, from `<root>/../LongCat-Video` where upstream's demos read them (as
    paths relative to the root, `../LongCat-Video/...`), unless the tree holds them itself."""
    components = keymap.avatar_spec()["variants"][variant]["sibling_components"]
    if all((root / name).is_dir() for name in components):
        return []
    sibling_name = keymap.avatar_spec()["sibling"]
    sibling = root.parent / sibling_name
    missing = [name for name in components if not (sibling / name).is_dir()]
    if missing:
        raise LongcatError(f"the base tree beside this avatar tree lacks {', '.join(m + '/' for m in missing)}",
                           sibling, f"put the LongCat-Video tree next to this one as {sibling_name}/ (upstream's "
                           "demos read tokenizer, text encoder and VAE there)")
    listing = list_files(sibling, follow_symlinks)
    raise_first_error(listing.problems)
    others = []
    for relative in listing.files:
        if relative.split("/", 1)[0] not in components:
            continue
        path = f"../{sibling_name}/{relative}"
        if is_pickle_name(relative):
            skipped.append(Skipped(path, PICKLE_REASON))
        else:
            others.append(OtherFile(path, (sibling / relative).stat().st_size))
    return others
