"""Tell which layout a checkpoint tree uses: raw (as published), fastvideo or diffusers.

raw        `dit/` exists
fastvideo  `transformer/config.json` names FastVideo's class (LongCatTransformer3DModel)
diffusers  `transformer/config.json` names the upstream class (LongCatVideoTransformer3DModel)

When `transformer/config.json` is missing or unreadable, `model_index.json`'s `_class_name` decides.
Anything else is an error that says what the folder holds and what it lacks to be a LongCat-Video tree;
`--layout` (inspect, validate) is suggested only where choosing a layout can help.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import keymap
from .errors import LongcatError
from .io.jsonfile import read_json_object

FASTVIDEO_PIPELINE_CLASSES = ("LongCatPipeline", "LongCatImageToVideoPipeline", "LongCatVideoContinuationPipeline")
COMPONENT_DIRS = ("dit", "transformer", "text_encoder", "tokenizer", "vae", "scheduler", "lora")
TREE_FIX = "point at the folder that holds dit/ or transformer/, e.g. the downloaded LongCat-Video folder"
SHOWN_ENTRIES = 8


@dataclass(frozen=True)
class DetectedLayout:
    name: str
    reason: str
    forced: bool = False


def detect_layout(root: str | Path, forced: str | None = None) -> DetectedLayout:
    """The layout of the tree at `root`; raises LongcatError when it is not a tree or none matches."""
    root = Path(root)
    check_root(root)
    present = [name for name in COMPONENT_DIRS if (root / name).is_dir()]
    if forced is not None:
        keymap.layout(forced)  # raises on an unknown name
        if not present and avatar_variant(root) is None:  # no layout makes a folder without any component a tree
            raise _not_a_tree(root, present)
        return DetectedLayout(forced, "forced with --layout", forced=True)
    if "dit" in present and "transformer" in present:
        raise LongcatError("holds both dit/ (raw layout) and transformer/ (fastvideo or diffusers layout)", root,
                           "remove the one that does not belong (inspect and validate can also be told the "
                           "layout with --layout raw|fastvideo|diffusers)")
    if "dit" in present:
        return DetectedLayout("raw", "dit/ exists")
    if "transformer" in present:
        return _from_transformer(root)
    variant = avatar_variant(root)
    if variant is not None:
        folders = ", ".join(f"{name}/" for name in avatar_folders(variant) if (root / name).is_dir())
        return DetectedLayout(keymap.avatar_spec()["variants"][variant]["raw_layout"],
                              f"a LongCat-Video-Avatar tree ({folders})")
    raise _not_a_tree(root, present)


def avatar_folders(variant: str) -> list[str]:
    spec = keymap.avatar_spec()["variants"][variant]
    return spec["dit_dirs"] + ([spec["int8_dir"]] if "int8_dir" in spec else [])


def avatar_variant(root: Path) -> str | None:
    """The avatar version of a raw LongCat-Video-Avatar tree, told by its DiT folders (avatar_single/ or
    avatar_multi/: 1.0; base_model/ or base_model_int8/: 1.5); None for anything else."""
    if (root / "dit").is_dir() or (root / "transformer").is_dir():
        return None
    for variant in sorted(keymap.avatar_spec()["variants"], reverse=True):
        if any((root / name).is_dir() for name in avatar_folders(variant)):
            return variant
    return None


def avatar_variant_of_layout(name: str, root: Path | None = None) -> str | None:
    """The avatar version a layout implies (raw avatar layouts), or, for a converted avatar tree at `root`, the
    one its audio encoder's model_type tells; None for a base layout or an unreadable encoder config."""
    if keymap.layout_family(name) != keymap.AVATAR_FAMILY:
        return None
    variants = keymap.avatar_spec()["variants"]
    for variant, spec in variants.items():
        if spec["raw_layout"] == name:
            return variant
    if root is None:
        return None
    try:
        model_type = read_json_object(root / keymap.avatar_spec()["audio_component"] / "config.json").get("model_type")
    except LongcatError:
        return None
    return next((v for v, spec in variants.items() if spec["audio_model_type"] == model_type), None)


def _not_a_tree(root: Path, present: list[str]) -> LongcatError:
    """What the folder holds and what it lacks: dit/ or transformer/ next to the other components."""
    if present:
        holds = f"it has {', '.join(name + '/' for name in present)} but no dit/ or transformer/"
    else:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
        shown = ", ".join(entries[:SHOWN_ENTRIES]) + (f", … ({len(entries)} entries)"
                                                      if len(entries) > SHOWN_ENTRIES else "")
        holds = f"it holds {shown}"
    return LongcatError(f"no LongCat-Video tree here: a tree has dit/ (raw layout) or transformer/ (fastvideo, "
                        f"diffusers) next to text_encoder/, tokenizer/, vae/ and scheduler/; {holds}", root, TREE_FIX)


def check_root(root: Path) -> None:
    if not root.exists():
        raise LongcatError("does not exist", root)
    if not root.is_dir():
        raise LongcatError("is not a directory (give the root folder of a checkpoint tree)", root)
    try:
        empty = next(root.iterdir(), None) is None
    except PermissionError:
        raise LongcatError("cannot be listed (permission denied)", root) from None
    if empty:
        raise LongcatError("is an empty directory: no checkpoint tree here", root)


def _from_transformer(root: Path) -> DetectedLayout:
    config_path = root / "transformer" / "config.json"
    class_name = _class_name(config_path)
    if class_name == keymap.class_name("fastvideo"):
        return DetectedLayout("fastvideo", f"transformer/config.json names {class_name}")
    if class_name == keymap.class_name("upstream"):
        return DetectedLayout("diffusers", f"transformer/config.json names {class_name}")
    for naming, target in (("fastvideo", "fastvideo"), ("upstream", "diffusers")):
        if class_name == keymap.class_name(naming, keymap.AVATAR_FAMILY):
            return DetectedLayout(keymap.avatar_target_layout(target), f"transformer/config.json names {class_name}")
    pipeline = _class_name(root / "model_index.json")
    if pipeline in FASTVIDEO_PIPELINE_CLASSES:
        return DetectedLayout("fastvideo", f"model_index.json names {pipeline}")
    if pipeline in keymap.load_map_document()["model_index"]["diffusers"]["pipeline_classes"]:
        return DetectedLayout("diffusers", f"model_index.json names {pipeline}")
    what = f"_class_name {class_name!r}" if class_name else "no readable _class_name"
    raise LongcatError(f"cannot tell the layout: transformer/config.json has {what}, expected "
                       f"{keymap.class_name('fastvideo')} (fastvideo) or {keymap.class_name('upstream')} (diffusers), "
                       f"and model_index.json does not say either", root,
                       "set transformer/config.json's _class_name to one of them (inspect and validate can also be "
                       "told the layout with --layout raw|fastvideo|diffusers)")


def _class_name(path: Path) -> str | None:
    try:
        document = read_json_object(path)
    except LongcatError:
        return None
    value = document.get("_class_name")
    return value if isinstance(value, str) else None
