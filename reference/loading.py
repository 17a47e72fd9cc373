"""Load a DiT (and its LoRAs) from a checkpoint tree of any layout: raw, diffusers or fastvideo.

Key sets are checked strictly against the key map before any tensor is read; a mismatch raises one
LongcatError line naming the first few missing / unexpected / mis-shaped keys and their counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from longcat_convert import keymap
from longcat_convert.errors import LongcatError
from longcat_convert.io import SafetensorsHeader, read_header, read_index, read_json_object, read_tensor
from longcat_convert.layout_detect import detect_layout

from .dit import LongcatDiT
from .lora import (
    FastvideoLoraTarget,
    UpstreamLoraModule,
    clear_loras,
    enable_runtime_loras,
    merge_fastvideo_lora,
    read_fastvideo_lora,
    read_upstream_lora,
)

SHOW = 5  # how many names an error message lists before "..."


@dataclass(frozen=True)
class Tree:
    root: Path
    layout: str
    naming: str
    dit_dir: Path
    config: dict
    lora_format: str
    lora_dir: Path

    @property
    def config_path(self) -> Path:
        return self.dit_dir / "config.json"


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    format: str  # "upstream" or "fastvideo"
    modules: dict[str, UpstreamLoraModule] | dict[str, FastvideoLoraTarget]


def open_tree(root: str | Path) -> Tree:
    """Open a tree of any layout: the layout as `longcat-convert validate` detects it, then its DiT config,
    which must name the class (or carry the head-count field) of that layout's naming."""
    root = Path(root)
    try:
        name = detect_layout(root).name
    except LongcatError as exc:  # the detector's own fix names validate's --layout, which these commands lack
        raise LongcatError(exc.message, exc.path, "point at the root of a raw, diffusers or fastvideo tree") from None
    spec = keymap.layouts()[name]
    config_path = root / spec["dit_dir"] / "config.json"
    if not config_path.is_file():
        raise LongcatError(f"no DiT config: {spec['dit_dir']}/config.json is missing from this {name} tree", root,
                           "restore the config that came with the checkpoint")
    config = read_json_object(config_path)
    if not _config_matches(config, spec["naming"]):
        raise LongcatError(f"this {name} tree's DiT config does not describe {keymap.class_name(spec['naming'])}",
                           config_path, "use the config that came with these weights")
    return Tree(root, name, spec["naming"], config_path.parent, config, spec["lora_format"], root / spec["lora_dir"])


def _config_matches(config: dict, naming: str) -> bool:
    class_name = config.get("_class_name")
    if class_name is not None:
        return class_name == keymap.class_name(naming)
    return keymap.heads_field(naming) in config


# ---- DiT weights ------------------------------------------------------------------------------------

def dit_tensors(tree: Tree) -> dict[str, SafetensorsHeader]:
    """Every tensor name of the DiT folder and the header of the file holding it."""
    indexes = sorted(tree.dit_dir.glob("*.safetensors.index.json"))
    files = sorted(tree.dit_dir.glob("*.safetensors"))
    if not files:
        raise LongcatError("no *.safetensors weights in the DiT folder", tree.dit_dir)
    if len(indexes) > 1:
        raise LongcatError(f"several shard indexes: {', '.join(p.name for p in indexes)}", tree.dit_dir)
    headers = {path.name: read_header(path) for path in files}
    located: dict[str, SafetensorsHeader] = {}
    for header in headers.values():
        for name in header.tensors:
            if name in located:
                raise LongcatError(f"tensor {name!r} is stored in both {located[name].path.name} and "
                                   f"{header.path.name}", tree.dit_dir, "remove the stray shard")
            located[name] = header
    if indexes:
        _check_index(indexes[0], headers, located)
    return located


def _check_index(index_path: Path, headers: dict[str, SafetensorsHeader],
                 located: dict[str, SafetensorsHeader]) -> None:
    index = read_index(index_path)
    problems = []
    absent = sorted(set(index.weight_map.values()) - set(headers))
    if absent:
        problems.append(f"names missing shards {_names(absent)}")
    unlisted = sorted(set(headers) - set(index.weight_map.values()))
    if unlisted:
        problems.append(f"does not reference {_names(unlisted)}")
    wrong = sorted(k for k, f in index.weight_map.items() if f in headers and located.get(k) is not headers[f])
    if wrong:
        problems.append(f"maps {_names(wrong)} to the wrong shard")
    stray = sorted(set(located) - set(index.weight_map))
    if stray:
        problems.append(f"does not list {_names(stray)}")
    if problems:
        raise LongcatError("shard index disagrees with the shards: " + "; ".join(problems), index_path)


def check_key_set(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str | Path,
                  what: str = "DiT weights") -> None:
    """Raise one LongcatError line if `found` is not exactly `expected` (names and shapes)."""
    message = describe_key_mismatch(found, expected)
    if message:
        raise LongcatError(f"{what} do not match the expected key set: {message}", where)


def describe_key_mismatch(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing {_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected {_names(unexpected)}")
    if shapes:
        shown = ", ".join(f"{k} {list(found[k])} != {list(expected[k])}" for k in shapes[:SHOW])
        parts.append(f"{len(shapes)} with wrong shape ({shown}{', ...' if len(shapes) > SHOW else ''})")
    return "; ".join(parts)


def _names(names: list[str]) -> str:
    return "(" + ", ".join(names[:SHOW]) + (", ..." if len(names) > SHOW else "") + ")"


def expand_checked(tree: Tree, located: dict[str, SafetensorsHeader] | None = None) -> keymap.ExpandedMap:
    """The key map for the tree's DiT config, once the config is proven to fit the weight files."""
    located = dit_tensors(tree) if located is None else located
    held = [header.tensors[name] for name, header in located.items()]
    keymap.check_fits(tree.config, tree.naming, str(tree.config_path), len(held), sum(i.numel for i in held))
    return keymap.expand(tree.config, tree.naming, str(tree.config_path))


def load_dit(source: str | Path | Tree, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> LongcatDiT:
    """Build the DiT in the tree's naming and fill it from the tree's shards, tensor by tensor."""
    tree = source if isinstance(source, Tree) else open_tree(source)
    located = dit_tensors(tree)
    expanded = expand_checked(tree, located)  # before LongcatDiT allocates what the config says
    dit = LongcatDiT(tree.config, tree.naming, dtype=dtype, device=device, where=str(tree.config_path))
    dropped = _check_droppable(located, expanded, tree.dit_dir)
    found = {name: header.tensors[name].shape for name, header in located.items() if name not in dropped}
    check_key_set(found, expanded.expected_shapes(tree.naming), tree.dit_dir)
    with torch.no_grad():
        for name, header in located.items():
            if name not in dropped:
                dit.get_parameter(name).copy_(read_tensor(header, name))
    return dit


def _check_droppable(located: dict[str, SafetensorsHeader], expanded: keymap.ExpandedMap, where: Path) -> set[str]:
    """Parameter-free LayerNorm keys may be present if they are the identity; anything else is an error."""
    dropped = set()
    for name in set(located) & set(expanded.drops):
        rule = expanded.drops[name]
        value = read_tensor(located[name], name).float()
        if not bool((value == (1.0 if rule.require == "ones" else 0.0)).all()):
            raise LongcatError(f"{name} is not all {rule.require}; the model has no such parameter", where)
        dropped.add(name)
    return dropped


# ---- LoRAs ------------------------------------------------------------------------------------------

def lora_paths(tree: Tree) -> dict[str, Path]:
    """LoRA files of the tree by name (the file stem): lora/*.safetensors, or lora/<sub>/*.safetensors for FastVideo."""
    if not tree.lora_dir.is_dir():
        return {}
    pattern = "*/*.safetensors" if tree.lora_format == "fastvideo" else "*.safetensors"
    paths: dict[str, Path] = {}
    for path in sorted(tree.lora_dir.glob(pattern)):
        if path.stem in paths:
            raise LongcatError(f"two LoRA files are named {path.stem}: {paths[path.stem]} and {path}", tree.lora_dir)
        paths[path.stem] = path
    return paths


def read_lora(tree: Tree, name: str) -> LoraFile:
    paths = lora_paths(tree)
    if name not in paths:
        raise LongcatError(f"no LoRA named {name!r}; available: {', '.join(paths) or 'none'}", tree.lora_dir)
    path = paths[name]
    modules = read_upstream_lora(path) if tree.lora_format == "upstream" else read_fastvideo_lora(path)
    return LoraFile(name, path, tree.lora_format, modules)


def apply_loras(dit: LongcatDiT, loras: list[LoraFile], multiplier: float = 1.0) -> None:
    """Make exactly `loras` active: upstream-format ones at run time, FastVideo-format ones merged."""
    clear_loras(dit)
    enable_runtime_loras(dit, [lora.modules for lora in loras if lora.format == "upstream"], multiplier,
                         ", ".join(str(lora.path) for lora in loras))
    for lora in loras:
        if lora.format == "fastvideo":
            merge_fastvideo_lora(dit, lora.modules, multiplier, lora.path)
