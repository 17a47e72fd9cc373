"""`inspect`: a short description of a tree from headers and configs only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .core import keymap
from .core.lora_format import part_name
from .core.tree import Adapter, Tree, read_tree

ARCH_FIELDS = ("hidden_size", "depth", "caption_channels", "adaln_tembed_dim", "mlp_ratio", "patch_size",
               "in_channels", "out_channels", "text_tokens_zero_pad")


def _adapter_summary(adapter: Adapter) -> dict:
    header, modules = adapter.header, adapter.lora.modules.values()
    ranks = Counter(m.rank for m in modules)
    return {"name": adapter.name, "file": adapter.file, "format": adapter.format, "modules": len(modules),
            "tensors": len(header.tensors), "bytes": sum(i.nbytes for i in header.tensors.values()),
            "ranks": {str(k): v for k, v in sorted(ranks.items())},
            part_name(adapter.format, "alpha"): sorted({adapter.lora.alphas[m.alpha] for m in modules}),
            "dtypes": sorted({i.dtype for i in header.tensors.values()})}


def describe(tree: Tree) -> dict:
    infos = [tree.dit.info(k) for k in tree.dit.key_files]
    census: Counter = Counter(i.dtype for i in infos)
    config = tree.dit.config
    heads = config.get(keymap.heads_field(tree.naming))
    return {
        "path": str(tree.root),
        "layout": tree.layout,
        "components": sorted(p.name for p in tree.root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        "dit": {
            "folder": tree.dit.folder,
            "class": config.get("_class_name"),
            "architecture": {**{k: config.get(k) for k in ARCH_FIELDS}, "heads": heads},
            "tensors": len(infos),
            "parameters": sum(i.numel for i in infos),
            "bytes": sum(i.nbytes for i in infos),
            "dtypes": dict(sorted(census.items())),
            "shards": len(tree.dit.headers),
            "index": tree.dit.index.path.name if tree.dit.index else None,
        },
        "adapters": [_adapter_summary(a) for a in tree.adapters],
        "model_index": tree.model_index.get("_class_name") if tree.model_index else None,
    }


def describe_path(path: Path, layout: str | None = None) -> dict:
    return describe(read_tree(path, layout))
