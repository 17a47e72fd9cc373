"""Load a DiT (and its LoRAs) from a checkpoint tree of any layout: raw, diffusers or fastvideo.

The tree is read by `longcat_convert.core.tree.read_tree`, the reader `convert` uses: the same shard-folder checks,
the same held files. Key sets are checked strictly against the key map before any tensor is read; a mismatch
raises one LongcatError line naming the first few missing / unexpected / mis-shaped keys and their counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from longcat_convert.core import keymap
from longcat_convert.core.errors import LongcatError
from longcat_convert.core.layout_detect import detect_layout
from longcat_convert.core.tree import Tree, read_tree, require_usable_dit

from .dit import LongcatDiT
from .lora_layers import (
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
class LoraFile:
    name: str
    path: Path
    format: str  # "upstream" or "fastvideo"
    modules: dict[str, UpstreamLoraModule] | dict[str, FastvideoLoraTarget]


def open_tree(root: str | Path, strict: bool = True, int8: bool = False) -> Tree:
    """Read a tree of any layout as `convert` reads it (the layout as `longcat-convert validate` detects it, the
    DiT config, shard headers and index, the LoRAs), through held files that tensors are later read from.
    strict=False: the DiT folder's problems are left in `tree.dit.problems` for the caller to report.
    int8: the DiT read is the tree's INT8 folder (`read_tree`'s int8)."""
    root = Path(root)
    try:
        name = detect_layout(root).name
    except LongcatError as exc:  # the detector's own fix names validate's --layout, which these commands lack
        raise LongcatError(exc.message, exc.path, "point at the root of a raw, diffusers or fastvideo tree") from None
    dit_dir = keymap.layout(name)["dit_dir"]
    if not int8 and not (root / dit_dir / "config.json").is_file():  # read_tree names a missing INT8 config
        raise LongcatError(f"no DiT config: {dit_dir}/config.json is missing from this {name} tree", root,
                           "restore the config that came with the checkpoint")
    return read_tree(root, name, follow_symlinks=True, strict=strict, int8=int8)


# ---- DiT weights ------------------------------------------------------------------------------------

def check_key_set(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str | Path,
                  what: str = "DiT weights") -> None:
    """Raise one LongcatError line if `found` is not exactly `expected` (names and shapes)."""
    mismatch = keymap.compare_key_sets(found, expected)
    if mismatch:
        raise LongcatError(f"{what} do not match the expected key set: {mismatch.describe(SHOW)}", where)


def expand_checked(tree: Tree) -> keymap.ExpandedMap:
    """The key map for the tree's DiT config, once the tree is proven readable and the config to fit its files."""
    require_usable_dit(tree.dit, tree.config_path, tree.naming)
    return keymap.expand(tree.dit.config, tree.naming, str(tree.config_path))


def load_dit(source: str | Path | Tree, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> LongcatDiT:
    """Build the DiT in the tree's naming and fill it from the tree's shards, tensor by tensor."""
    tree = source if isinstance(source, Tree) else open_tree(source)
    check_dit_keys(tree)  # before LongcatDiT allocates what the config says
    dit = LongcatDiT(tree.dit.config, tree.naming, dtype=dtype, device=device, where=str(tree.config_path))
    return fill_dit(dit, tree)


def fill_dit(dit: LongcatDiT, tree: Tree) -> LongcatDiT:
    """Fill `dit` (built for the tree's config, in either naming) from the tree's shards, tensor by tensor, after
    checking the tree's key set strictly. Across namings the key map says which source tensors make each target:
    FastVideo's row-split projections are joined into upstream's fused ones, or upstream's split."""
    expanded, dropped = check_dit_keys(tree)
    with torch.no_grad():
        if dit.naming == tree.naming:
            for name in tree.dit.key_files:
                if name not in dropped:
                    dit.get_parameter(name).copy_(tree.tensor(name))
            return dit
        for rule in expanded.params:
            sources, targets = rule.keys(tree.naming), rule.keys(dit.naming)
            fused = torch.cat([tree.tensor(name) for name in sources]) if len(sources) > 1 else tree.tensor(sources[0])
            for name, part in zip(targets, fused.chunk(len(targets)), strict=True):
                dit.get_parameter(name).copy_(part)
    return dit


def check_dit_keys(tree: Tree) -> tuple[keymap.ExpandedMap, set[str]]:
    """The key map for the tree's config once its DiT key set is proven exact (headers only, plus the values of
    droppable identity LayerNorm keys), and the keys the model has no parameter for."""
    expanded = expand_checked(tree)
    dit_dir = tree.root / tree.dit.folder
    dropped = _check_droppable(tree, expanded, dit_dir)
    found = {name: tree.dit.info(name).shape for name in tree.dit.key_files if name not in dropped}
    check_key_set(found, expanded.expected_shapes(tree.naming), dit_dir)
    return expanded, dropped


def _check_droppable(tree: Tree, expanded: keymap.ExpandedMap, where: Path) -> set[str]:
    """Parameter-free LayerNorm keys may be present if they are the identity; anything else is an error."""
    dropped = set()
    for name in set(tree.dit.key_files) & set(expanded.drops):
        rule = expanded.drops[name]
        value = tree.tensor(name).float()
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


def upstream_lora_ranks(tree: Tree) -> dict[str, int]:
    """Name -> rank of the tree's upstream-format adapters directly in lora/ (where upstream's pipeline loads
    them from): upstream's load_lora must be told the rank, which its own loader cannot infer."""
    return {adapter.name: next(iter(adapter.lora.modules.values())).rank for adapter in tree.adapters
            if adapter.lora.format == "upstream" and adapter.lora.modules and Path(adapter.file).parent == Path("lora")}
